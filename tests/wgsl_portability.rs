//! Every WGSL kernel, in every variant (with and without f16, with and without subgroups), parses,
//! validates, and translates with naga to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL (GL), so
//! that a shader that would not build on one backend fails here, on any machine. The f16 variants skip
//! GLSL: wgpu's GL backend never offers shader-f16, and naga 30's GLSL writer has no 16-bit floats.
//! Kernels that require f16 (`Kernel::requires_f16`) exist only in their f16 variants; those on
//! cooperative matrices (`Kernel::cooperative`) only for SPIR-V: naga 30 writes 16 x 16 cooperative
//! matrices for Vulkan alone.

use naga::back::pipeline_constants::process_overrides;
use naga::valid::{
    Capabilities, ModuleInfo, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator,
};
use naga::{AddressSpace, Module, ShaderStage, StorageAccess};
use upg::gpu::shader::{library, preprocess, Binding, Kernel, Variant};

/// Override values that the launchers use besides the defaults (largest shapes, every mode).
fn override_sets(k: Kernel) -> Vec<Vec<(&'static str, f64)>> {
    match k {
        Kernel::Spmv => vec![
            vec![],
            vec![
                ("SLICES", 32.0),
                ("TILE_BLOCKS", 40.0),
                ("GROUP_BLOCKS", 4.0),
                ("RESIDUAL", 1.0),
            ],
            vec![("SLICES", 1.0), ("TILE_BLOCKS", 1.0), ("RESIDUAL", 2.0)],
            vec![
                ("PROLOGUE", 1.0),
                ("EPS", 1e-6),
                ("RESIDUAL", 0.0),
                ("ROW_LANES", 2.0),
            ],
            vec![
                ("PROLOGUE", 2.0),
                ("SLICES", 16.0),
                ("RESIDUAL", 2.0),
                ("ROW_LANES", 32.0),
                ("STAGE_ROUNDS", 1.0),
            ],
            vec![("PROLOGUE", 1.0), ("COL_SPLIT", 5.0), ("ROW_LANES", 2.0)],
            vec![("PROLOGUE", 1.0), ("EPILOGUE", 1.0)],
        ],
        Kernel::SpmvCombine => vec![
            vec![],
            vec![("PROLOGUE", 1.0), ("EPS", 1e-6), ("RESIDUAL", 1.0)],
            vec![("RESIDUAL", 2.0)],
            vec![("PROLOGUE", 1.0), ("EPILOGUE", 1.0)],
        ],
        Kernel::SiluMul => vec![vec![], vec![("PAIRS", 1.0)]],
        Kernel::Decompress => vec![vec![], vec![("OUT_F32", 1.0), ("GROUP_BLOCKS", 3.0)]],
        Kernel::GemvQ4 => vec![
            vec![],
            vec![("GROUP_CHUNKS", 2.0), ("RESIDUAL", 1.0), ("QUADS", 2.0)],
            vec![("QUADS", 3.0), ("RESIDUAL", 2.0)],
        ],
        Kernel::GemvQ3 => vec![
            vec![],
            vec![("GROUP_RUNS", 1.0), ("ROWS", 4.0), ("RESIDUAL", 1.0)],
            vec![("GROUP_RUNS", 2.0), ("ROWS", 1.0), ("RESIDUAL", 2.0)],
            vec![("STAGE_X", 0.0), ("ROWS", 2.0)],
        ],
        Kernel::GemvF16 | Kernel::GemvF32 => vec![vec![], vec![("RESIDUAL", 2.0)]],
        Kernel::KvStore | Kernel::RopeKv => vec![vec![], vec![("KV_F16", 0.0)]],
        Kernel::AttentionSplit => vec![
            vec![],
            vec![("KV_F16", 0.0)],
            vec![("ROPE_HALF", 48.0)],
            vec![("KV_F16", 0.0), ("ROPE_HALF", 64.0)],
        ],
        Kernel::Attention => vec![vec![], vec![("KV_F16", 0.0), ("ROWS", 16.0)]],
        Kernel::Embed => vec![
            vec![],
            vec![("CODEC", 1.0)],
            vec![("CODEC", 2.0)],
            vec![("CODEC", 3.0)],
            vec![("FROM_TOKEN", 1.0)],
        ],
        Kernel::Spmm => vec![
            vec![],
            vec![("GROUP_BLOCKS", 4.0), ("RESIDUAL", 1.0)],
            vec![("CODEC", 1.0), ("RESIDUAL", 2.0)],
            vec![("CODEC", 2.0)],
            vec![("CODEC", 3.0), ("GROUP_CHUNKS", 2.0)],
        ],
        Kernel::SpmmCoop => vec![
            vec![],
            vec![("GROUP_BLOCKS", 4.0), ("RESIDUAL", 1.0)],
            vec![
                ("X_LO", 0.0),
                ("RESIDUAL", 2.0),
                ("BN", 64.0),
                ("SPLIT", 2.0),
            ],
        ],
        Kernel::Copy
        | Kernel::Rmsnorm
        | Kernel::Rope
        | Kernel::Add
        | Kernel::Argmax
        | Kernel::AttentionCombine
        | Kernel::SplitF16 => vec![vec![]],
    }
}

/// pack2x16float / unpack2x16float need SHADER_FLOAT16_IN_FLOAT32 (wgpu's downlevel flag
/// SHADER_F16_IN_F32, which Vulkan, Metal and DX12 always have); the variants add f16 and subgroups.
fn capabilities(k: Kernel, v: Variant) -> Capabilities {
    let mut c = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if k.cooperative() {
        c |= Capabilities::COOPERATIVE_MATRIX;
    }
    if v.f16 {
        c |= Capabilities::SHADER_FLOAT16;
    }
    if v.subgroups {
        c |= Capabilities::SUBGROUP;
    }
    c
}

fn validate(module: &Module, caps: Capabilities) -> Result<ModuleInfo, String> {
    Validator::new(ValidationFlags::all(), caps)
        .subgroup_stages(ShaderStages::COMPUTE)
        .subgroup_operations(SubgroupOperationSet::all())
        .validate(module)
        .map_err(|e| format!("{e:?}"))
}

fn translate(module: &Module, info: &ModuleInfo, f16: bool, k: Kernel) -> Result<(), String> {
    let ep = "main".to_string();
    let spv = naga::back::spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    naga::back::spv::write_vec(
        module,
        info,
        &spv,
        Some(&naga::back::spv::PipelineOptions {
            shader_stage: ShaderStage::Compute,
            entry_point: ep.clone(),
        }),
    )
    .map_err(|e| format!("SPIR-V: {e}"))?;
    if k.cooperative() {
        return Ok(());
    }

    let msl = naga::back::msl::Options {
        lang_version: (2, 4),
        ..Default::default()
    };
    naga::back::msl::write_string(
        module,
        info,
        &msl,
        &naga::back::msl::PipelineOptions {
            entry_point: Some((ShaderStage::Compute, ep.clone())),
            ..Default::default()
        },
    )
    .map_err(|e| format!("MSL: {e}"))?;

    let hlsl = naga::back::hlsl::Options {
        shader_model: naga::back::hlsl::ShaderModel::V6_2,
        ..Default::default()
    };
    let pipeline = naga::back::hlsl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, ep.clone())),
    };
    let mut out = String::new();
    naga::back::hlsl::Writer::new(&mut out, &hlsl, &pipeline)
        .write(module, info, None)
        .map_err(|e| format!("HLSL: {e}"))?;

    if f16 {
        return Ok(());
    }
    let glsl = naga::back::glsl::Options {
        version: naga::back::glsl::Version::Desktop(450),
        ..Default::default()
    };
    let mut out = String::new();
    naga::back::glsl::Writer::new(
        &mut out,
        module,
        info,
        &glsl,
        &naga::back::glsl::PipelineOptions {
            shader_stage: ShaderStage::Compute,
            entry_point: ep,
            multiview: None,
        },
        naga::proc::BoundsCheckPolicies::default(),
    )
    .and_then(|mut w| w.write().map(|_| ()))
    .map_err(|e| format!("GLSL: {e}"))?;
    Ok(())
}

#[test]
fn every_kernel_variant_translates_to_every_backend() {
    for k in Kernel::ALL {
        for v in Variant::ALL
            .into_iter()
            .filter(|v| v.f16 || !k.requires_f16())
        {
            let src = k.variant_source(v).unwrap();
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{} {v:?}: {}", k.file(), e.emit_to_string(&src)));
            let info = validate(&module, capabilities(k, v))
                .unwrap_or_else(|e| panic!("{} {v:?}: {e}", k.file()));
            for set in override_sets(k) {
                let constants = set.iter().map(|&(n, x)| (n.to_string(), x)).collect();
                let (m, i) = process_overrides(
                    &module,
                    &info,
                    Some((ShaderStage::Compute, "main")),
                    &constants,
                )
                .unwrap_or_else(|e| panic!("{} {v:?} {set:?}: {e}", k.file()));
                translate(&m, &i, v.f16, k)
                    .unwrap_or_else(|e| panic!("{} {v:?} {set:?}: {e}", k.file()));
            }
        }
    }
}

#[test]
fn variants_without_a_feature_do_not_need_it() {
    // The f32 / non-subgroup builds must validate on an adapter that has neither feature (kernels that
    // require f16 have no such build: their launchers use other kernels there).
    for k in Kernel::ALL.into_iter().filter(|k| !k.requires_f16()) {
        let plain = k.variant_source(Variant::default()).unwrap();
        let module = naga::front::wgsl::parse_str(&plain).unwrap();
        validate(&module, capabilities(k, Variant::default()))
            .unwrap_or_else(|e| panic!("{}: {e}", k.file()));
        assert!(
            !plain.contains("f16") || !plain.contains("enable f16"),
            "{}",
            k.file()
        );
    }
}

#[test]
fn every_wgsl_file_is_a_registered_kernel() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wgsl");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    let mut known: Vec<String> = Kernel::ALL.iter().map(|k| k.file().to_string()).collect();
    known.sort();
    assert_eq!(files, known);
    for k in Kernel::ALL {
        let on_disk = std::fs::read_to_string(dir.join(k.file())).unwrap();
        assert_eq!(
            on_disk,
            k.source(),
            "{} differs from the compiled-in source",
            k.file()
        );
    }
}

#[test]
fn headers_name_what_the_kernel_needs() {
    for k in Kernel::ALL {
        let header: String = k
            .source()
            .lines()
            .take_while(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let name = k.file().trim_end_matches(".wgsl");
        assert!(
            header.starts_with(&format!("// {name}:")),
            "{} must start with '// {name}: what it computes'",
            k.file()
        );
        for word in ["Bindings", "Workgroup", "Dispatch", "Features"] {
            assert!(
                header.contains(word),
                "{} header does not say '{word}'",
                k.file()
            );
        }
    }
}

#[test]
fn binding_tables_match_the_shaders() {
    for k in Kernel::ALL {
        let src = k.variant_source(Variant::default()).unwrap();
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let mut found: Vec<(u32, Binding)> = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref()?;
                assert_eq!(b.group, 0, "{}: group {}", k.file(), b.group);
                let kind = match g.space {
                    AddressSpace::Uniform => Binding::Uniform,
                    AddressSpace::Storage { access } if access.contains(StorageAccess::STORE) => {
                        Binding::ReadWrite
                    }
                    AddressSpace::Storage { .. } => Binding::Read,
                    other => panic!("{}: binding {} in {other:?}", k.file(), b.binding),
                };
                Some((b.binding, kind))
            })
            .collect();
        found.sort_by_key(|f| f.0);
        let want: Vec<(u32, Binding)> = k
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, &b)| (i as u32, b))
            .collect();
        assert_eq!(found, want, "{}", k.file());
    }
}

#[test]
fn preprocessor_keeps_one_side_and_reports_mistakes() {
    let src = "a\n// #if f16\nb\n// #else\nc\n// #endif\nd\n";
    let on = preprocess(
        src,
        Variant {
            f16: true,
            subgroups: false,
        },
    )
    .unwrap();
    let off = preprocess(src, Variant::default()).unwrap();
    assert_eq!(on, "a\n\nb\n\n\n\nd\n");
    assert_eq!(off, "a\n\n\n\nc\n\nd\n");
    assert!(preprocess("// #if f16\n", Variant::default())
        .unwrap_err()
        .contains("never closed"));
    assert!(preprocess("// #if f17\n// #endif\n", Variant::default())
        .unwrap_err()
        .contains("f17"));
    assert!(preprocess("// #endif\n", Variant::default()).is_err());
    assert!(
        preprocess("// #if f16\n// #if subgroups\n", Variant::default())
            .unwrap_err()
            .contains("nested")
    );
    assert!(preprocess("// #include nothing.wgsl\n", Variant::default()).is_err());
    assert!(preprocess(
        "// #if f16\n// #include team_sum.wgsl\n// #endif\n",
        Variant::default()
    )
    .is_err());
    // An include brings the library file in, preprocessed for the same variant.
    let with = preprocess("// #include team_sum.wgsl\n", Variant::ALL[3]).unwrap();
    assert!(with.contains("fn team_store") && with.contains("subgroupShuffleXor"));
    let without = preprocess("// #include team_sum.wgsl\n", Variant::default()).unwrap();
    assert!(without.contains("fn team_store") && !without.contains("subgroupShuffleXor"));
}

#[test]
fn every_library_file_is_known_and_used() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wgsl/lib");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert_eq!(library(&name), Some(on_disk.as_str()), "wgsl/lib/{name}");
        let directive = format!("// #include {name}");
        assert!(
            Kernel::ALL.iter().any(|k| k.source().contains(&directive)),
            "wgsl/lib/{name} is included by no kernel"
        );
    }
}
