//! The WGSL kernels: their sources (from `wgsl/`, nothing else holds shader source), their bindings, and
//! the small preprocessor that makes the f16 and subgroup variants out of one file.
//!
//! Preprocessing: a line `// #if f16` or `// #if subgroups` opens a section kept only in that variant,
//! `// #else` switches to the section kept otherwise, `// #endif` closes it (no nesting). Dropped lines
//! become empty lines, so naga's error positions still match the file. A line `// #include NAME` (outside
//! sections) is replaced by `wgsl/lib/NAME`, itself preprocessed: code that several kernels share. WGSL
//! declarations may follow their use, so includes go last and the file's own line numbers stay right.

/// One WGSL file in `wgsl/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Copy,
    Spmv,
    SpmvCombine,
    Decompress,
    GemvF16,
    GemvF32,
    GemvQ4,
    GemvQ3,
    Rmsnorm,
    Rope,
    RopeKv,
    KvStore,
    Attention,
    AttentionSplit,
    AttentionCombine,
    SiluMul,
    Add,
    Argmax,
    Embed,
    Spmm,
    SpmmCoop,
    SplitF16,
}

/// How a kernel uses one binding of group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Uniform,
    Read,
    ReadWrite,
}

/// Which optional features a build of a kernel uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Variant {
    pub f16: bool,
    pub subgroups: bool,
}

impl Variant {
    /// All four combinations.
    pub const ALL: [Variant; 4] = [
        Variant {
            f16: false,
            subgroups: false,
        },
        Variant {
            f16: true,
            subgroups: false,
        },
        Variant {
            f16: false,
            subgroups: true,
        },
        Variant {
            f16: true,
            subgroups: true,
        },
    ];
}

use Binding::{Read, ReadWrite, Uniform};

impl Kernel {
    pub const ALL: [Kernel; 22] = [
        Kernel::Copy,
        Kernel::Spmv,
        Kernel::SpmvCombine,
        Kernel::Decompress,
        Kernel::GemvF16,
        Kernel::GemvF32,
        Kernel::GemvQ4,
        Kernel::GemvQ3,
        Kernel::Rmsnorm,
        Kernel::Rope,
        Kernel::RopeKv,
        Kernel::KvStore,
        Kernel::Attention,
        Kernel::AttentionSplit,
        Kernel::AttentionCombine,
        Kernel::SiluMul,
        Kernel::Add,
        Kernel::Argmax,
        Kernel::Embed,
        Kernel::Spmm,
        Kernel::SpmmCoop,
        Kernel::SplitF16,
    ];

    /// Whether every loop of the kernel runs a count fixed before it starts, so that wgpu's loop
    /// bounding (a counter and a branch per iteration, against GPU hangs) can be left out: on an H100
    /// it made spmv 25-35% slower (BENCHMARKS.md).
    pub fn loops_end(self) -> bool {
        matches!(
            self,
            Kernel::Spmv
                | Kernel::Decompress
                | Kernel::GemvQ4
                | Kernel::GemvQ3
                | Kernel::Spmm
                | Kernel::SpmmCoop
        )
    }

    /// Whether the kernel uses cooperative matrices (wgpu's experimental feature, Vulkan's
    /// VK_KHR_cooperative_matrix): it is built only with f16, only where the device has them, and only
    /// SPIR-V has 16 x 16 matrices (naga's MSL has 8 x 8 simdgroup matrices, HLSL and GLSL none).
    pub fn cooperative(self) -> bool {
        self == Kernel::SpmmCoop
    }

    /// Whether the kernel exists only with shader-f16 (its launcher never runs it without).
    pub fn requires_f16(self) -> bool {
        matches!(self, Kernel::SpmmCoop | Kernel::SplitF16)
    }

    /// Whether the file declares the override constant `name`.
    pub fn declares(self, name: &str) -> bool {
        self.source().lines().any(|l| {
            l.trim_start()
                .strip_prefix("override ")
                .is_some_and(|r| r.split([':', ' ', '=']).next() == Some(name))
        })
    }

    /// The file name in `wgsl/`.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::Copy => "copy.wgsl",
            Kernel::Spmv => "spmv.wgsl",
            Kernel::SpmvCombine => "spmv_combine.wgsl",
            Kernel::Decompress => "decompress.wgsl",
            Kernel::GemvF16 => "gemv_f16.wgsl",
            Kernel::GemvF32 => "gemv_f32.wgsl",
            Kernel::GemvQ4 => "gemv_q4.wgsl",
            Kernel::GemvQ3 => "gemv_q3.wgsl",
            Kernel::Rmsnorm => "rmsnorm.wgsl",
            Kernel::Rope => "rope.wgsl",
            Kernel::RopeKv => "rope_kv.wgsl",
            Kernel::KvStore => "kv_store.wgsl",
            Kernel::Attention => "attention.wgsl",
            Kernel::AttentionSplit => "attention_split.wgsl",
            Kernel::AttentionCombine => "attention_combine.wgsl",
            Kernel::SiluMul => "silu_mul.wgsl",
            Kernel::Add => "add.wgsl",
            Kernel::Argmax => "argmax.wgsl",
            Kernel::Embed => "embed.wgsl",
            Kernel::Spmm => "spmm.wgsl",
            Kernel::SpmmCoop => "spmm_coop.wgsl",
            Kernel::SplitF16 => "split_f16.wgsl",
        }
    }

    /// The file as written.
    pub fn source(self) -> &'static str {
        match self {
            Kernel::Copy => include_str!("../../wgsl/copy.wgsl"),
            Kernel::Spmv => include_str!("../../wgsl/spmv.wgsl"),
            Kernel::SpmvCombine => include_str!("../../wgsl/spmv_combine.wgsl"),
            Kernel::Decompress => include_str!("../../wgsl/decompress.wgsl"),
            Kernel::GemvF16 => include_str!("../../wgsl/gemv_f16.wgsl"),
            Kernel::GemvF32 => include_str!("../../wgsl/gemv_f32.wgsl"),
            Kernel::GemvQ4 => include_str!("../../wgsl/gemv_q4.wgsl"),
            Kernel::GemvQ3 => include_str!("../../wgsl/gemv_q3.wgsl"),
            Kernel::Rmsnorm => include_str!("../../wgsl/rmsnorm.wgsl"),
            Kernel::Rope => include_str!("../../wgsl/rope.wgsl"),
            Kernel::RopeKv => include_str!("../../wgsl/rope_kv.wgsl"),
            Kernel::KvStore => include_str!("../../wgsl/kv_store.wgsl"),
            Kernel::Attention => include_str!("../../wgsl/attention.wgsl"),
            Kernel::AttentionSplit => include_str!("../../wgsl/attention_split.wgsl"),
            Kernel::AttentionCombine => include_str!("../../wgsl/attention_combine.wgsl"),
            Kernel::SiluMul => include_str!("../../wgsl/silu_mul.wgsl"),
            Kernel::Add => include_str!("../../wgsl/add.wgsl"),
            Kernel::Argmax => include_str!("../../wgsl/argmax.wgsl"),
            Kernel::Embed => include_str!("../../wgsl/embed.wgsl"),
            Kernel::Spmm => include_str!("../../wgsl/spmm.wgsl"),
            Kernel::SpmmCoop => include_str!("../../wgsl/spmm_coop.wgsl"),
            Kernel::SplitF16 => include_str!("../../wgsl/split_f16.wgsl"),
        }
    }

    /// Bindings 0.. of group 0, as the file's header comment lists them.
    pub fn bindings(self) -> &'static [Binding] {
        match self {
            Kernel::Copy => &[Uniform, Read, ReadWrite],
            Kernel::Spmv => &[Uniform, Read, Read, Read, Read, Read, ReadWrite, Read, Read],
            Kernel::SpmvCombine => &[Uniform, Read, ReadWrite, Read],
            Kernel::Decompress => &[Uniform, Read, Read, Read, Read, ReadWrite],
            Kernel::GemvF16 | Kernel::GemvF32 => &[Uniform, Read, Read, ReadWrite, Read],
            Kernel::GemvQ4 | Kernel::GemvQ3 => &[Uniform, Read, Read, Read, ReadWrite, Read],
            Kernel::Rmsnorm => &[Uniform, Read, Read, ReadWrite],
            Kernel::Rope => &[Uniform, ReadWrite, Read, Read, Read],
            Kernel::RopeKv => &[Uniform, ReadWrite, Read, Read, ReadWrite, ReadWrite, Read],
            Kernel::KvStore => &[Uniform, Read, ReadWrite, ReadWrite, Read],
            Kernel::Attention => &[Uniform, Read, Read, Read, ReadWrite, Read],
            Kernel::AttentionSplit => &[
                Uniform, Read, ReadWrite, ReadWrite, ReadWrite, Read, Read, Read,
            ],
            Kernel::AttentionCombine => &[Uniform, Read, ReadWrite, Read],
            Kernel::SiluMul | Kernel::SplitF16 => &[Uniform, Read, ReadWrite],
            Kernel::Add => &[Uniform, ReadWrite, Read],
            Kernel::Argmax => &[Uniform, Read, ReadWrite],
            Kernel::Embed => &[Uniform, Read, Read, ReadWrite, Read],
            Kernel::Spmm => &[Uniform, Read, Read, Read, Read, Read, ReadWrite, Read],
            Kernel::SpmmCoop => &[
                Uniform, Read, Read, Read, Read, Read, ReadWrite, Read, ReadWrite,
            ],
        }
    }

    /// The source of one variant, preprocessed.
    pub fn variant_source(self, variant: Variant) -> Result<String, String> {
        preprocess(self.source(), variant).map_err(|e| format!("{}: {e}", self.file()))
    }
}

/// The shared sources in `wgsl/lib/`, by the name an `// #include` gives.
pub fn library(name: &str) -> Option<&'static str> {
    match name {
        "team_sum.wgsl" => Some(include_str!("../../wgsl/lib/team_sum.wgsl")),
        "attention_chunks.wgsl" => Some(include_str!("../../wgsl/lib/attention_chunks.wgsl")),
        "attention_params.wgsl" => Some(include_str!("../../wgsl/lib/attention_params.wgsl")),
        "workgroup_reduce.wgsl" => Some(include_str!("../../wgsl/lib/workgroup_reduce.wgsl")),
        "sparse_record.wgsl" => Some(include_str!("../../wgsl/lib/sparse_record.wgsl")),
        _ => None,
    }
}

/// Keeps the lines of `src` that belong to `variant` and expands includes (see the module comment).
pub fn preprocess(src: &str, variant: Variant) -> Result<String, String> {
    // None: outside any section; Some(keep): inside one, keeping its lines or not.
    let mut keep: Option<bool> = None;
    let mut open_line = 0;
    let mut out = String::with_capacity(src.len());
    for (n, line) in src.lines().enumerate() {
        let directive = line.trim().strip_prefix("// #").map(str::trim);
        let mut emit = keep.unwrap_or(true);
        match directive {
            Some(d) if d.starts_with("if ") => {
                if keep.is_some() {
                    return Err(format!(
                        "line {}: nested #if (opened on line {open_line})",
                        n + 1
                    ));
                }
                keep = Some(match d[3..].trim() {
                    "f16" => variant.f16,
                    "subgroups" => variant.subgroups,
                    other => return Err(format!("line {}: unknown condition '{other}'", n + 1)),
                });
                open_line = n + 1;
                emit = false;
            }
            Some("else") => {
                keep = Some(!keep.ok_or(format!("line {}: #else outside #if", n + 1))?);
                emit = false;
            }
            Some("endif") => {
                keep.ok_or(format!("line {}: #endif outside #if", n + 1))?;
                keep = None;
                emit = false;
            }
            Some(d) if d.starts_with("include ") => {
                if keep.is_some() {
                    return Err(format!("line {}: #include inside #if", n + 1));
                }
                let name = d[8..].trim();
                let lib = library(name)
                    .ok_or(format!("line {}: no wgsl/lib/{name} to include", n + 1))?;
                if lib.lines().any(|l| l.trim().starts_with("// #include")) {
                    return Err(format!("wgsl/lib/{name}: includes do not nest"));
                }
                out.push_str(&preprocess(lib, variant).map_err(|e| format!("{name}: {e}"))?);
                continue;
            }
            _ => {}
        }
        if emit {
            out.push_str(line);
        }
        out.push('\n');
    }
    match keep {
        Some(_) => Err(format!("#if on line {open_line} is never closed")),
        None => Ok(out),
    }
}
