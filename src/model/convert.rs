//! A whole model in one .upg file: conversion from a Hugging Face folder, tensor by tensor, and loading
//! it back.
//!
//! Inside the file (see [`crate::format::file`] for the container): every weight matrix under its
//! Hugging Face name, in the codec the [`CodecPlan`] gives its role; the norm weights as f32 arrays;
//! config.json, as published, in the metadata key [`CONFIG_KEY`]; the tokenizer files as byte blobs
//! `tokenizer/<file name>`. Conversion holds one tensor at a time (Phi-4 is 29 GB in bf16) and never
//! leaves a half-written file: the writer renames its temporary file only when every tensor is in.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;

use super::calibration::ActivationNorms;
use super::checkpoint::Checkpoint;
use super::codec_choice::{choose_for, Candidate, TensorChoice};
use super::config::Config;
use super::error::{ModelError, Result, TokenizerError};
use super::tokenizer::TokenizerFiles;
use super::weights::{encode_from_checkpoint, CodecPlan, HostWeights, MatrixName, Role, Weights};
use crate::format::file::{MatrixSpec, Plan, UpgFile, UpgWriter};
use crate::format::{Codec, Q3Matrix, Tensor};

/// Metadata key holding config.json's text.
pub const CONFIG_KEY: &str = "upg.model.config";
/// Metadata key holding the codec of each role, for reports.
pub const CODECS_KEY: &str = "upg.model.codecs";
/// Blob name prefix of the tokenizer files.
pub const TOKENIZER_PREFIX: &str = "tokenizer/";

/// Where conversion is, for a progress bar: parameters done of the total, and the tensor just written.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    pub done: usize,
    pub total: usize,
    pub tensor: &'a str,
    pub codec: Codec,
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct Converted {
    /// (name, codec, [rows, cols], bits per parameter) of every matrix, in file order.
    pub matrices: Vec<(String, Codec, [usize; 2], f64)>,
    /// Parameters of all matrices and vectors.
    pub params: usize,
    /// Size of the .upg file.
    pub file_bytes: u64,
    /// Whether tokenizer files were found and stored.
    pub tokenizer: bool,
}

fn spec(m: &MatrixName, plan: &CodecPlan) -> MatrixSpec {
    let codec = plan.codec(m.role);
    MatrixSpec {
        codec,
        rows: m.rows,
        cols: m.cols,
        group: match codec {
            Codec::Sparse => Some(plan.sparse_group),
            Codec::Q4 => Some(plan.q4_group),
            Codec::Q3 => Some(Q3Matrix::DEFAULT_GROUP),
            Codec::F32 | Codec::F16 => None,
        },
    }
}

/// Converts the Hugging Face model folder `dir` into the .upg file `out`, calling `progress` after each
/// tensor.
pub fn convert(
    dir: &Path,
    out: &Path,
    plan: &CodecPlan,
    progress: impl FnMut(Progress),
) -> Result<Converted> {
    convert_calibrated(dir, out, plan, None, progress)
}

/// [`convert`], the sparse codec pruning by Wanda saliency with `norms` (see
/// [`ActivationNorms::collect`]) where given.
pub fn convert_calibrated(
    dir: &Path,
    out: &Path,
    plan: &CodecPlan,
    norms: Option<&ActivationNorms>,
    progress: impl FnMut(Progress),
) -> Result<Converted> {
    let ckpt = Checkpoint::open(dir)?;
    write(
        &ckpt,
        dir,
        out,
        plan,
        norms,
        &HashMap::new(),
        None,
        progress,
    )
}

/// Codecs chosen per matrix by measured error (see [`super::codec_choice`]).
#[derive(Clone, Debug)]
pub struct Budget {
    /// All-in bits per parameter that no chosen matrix may exceed.
    pub bits: f64,
    /// The roles whose matrices are chosen; the others take the plan's codec.
    pub roles: Vec<Role>,
}

/// [`convert_calibrated`], every matrix of `budget.roles` in the candidate codec of lowest measured
/// error within `budget.bits` (output error on `calib`'s sampled inputs where it has them, see
/// [`ActivationNorms::collect_sampled`]; weight error otherwise). `report` sees each choice as it is
/// made, before anything is written; the choices are returned with what was written.
pub fn convert_budget(
    dir: &Path,
    out: &Path,
    plan: &CodecPlan,
    budget: &Budget,
    calib: Option<&ActivationNorms>,
    mut report: impl FnMut(&TensorChoice),
    progress: impl FnMut(Progress),
) -> Result<(Converted, Vec<TensorChoice>)> {
    if budget.bits.is_nan() || budget.bits <= 0.0 {
        return Err(ModelError::Choice(format!(
            "a budget of {} bits per parameter: give a positive number such as 3.2",
            budget.bits
        )));
    }
    let ckpt = Checkpoint::open(dir)?;
    let mut choices = Vec::new();
    Weights::<(), ()>::build(
        &ckpt.config,
        |m| {
            if budget.roles.contains(&m.role) {
                let view = ckpt.matrix(m.name, m.rows, m.cols)?;
                let choice = choose_for(&m, &view.dense(), budget.bits, calib)?;
                report(&choice);
                choices.push(choice);
            }
            Ok::<(), ModelError>(())
        },
        |_, _| Ok(()),
    )?;
    let chosen: HashMap<String, Candidate> = choices
        .iter()
        .map(|c| (c.name.clone(), c.chosen().candidate))
        .collect();
    let converted = write(
        &ckpt,
        dir,
        out,
        plan,
        calib,
        &chosen,
        Some(budget.bits),
        progress,
    )?;
    Ok((converted, choices))
}

/// Writes the .upg file: matrices named in `chosen` in that candidate, the others per `plan`.
#[allow(clippy::too_many_arguments)]
fn write(
    ckpt: &Checkpoint,
    dir: &Path,
    out: &Path,
    plan: &CodecPlan,
    norms: Option<&ActivationNorms>,
    chosen: &HashMap<String, Candidate>,
    bits: Option<f64>,
    mut progress: impl FnMut(Progress),
) -> Result<Converted> {
    let spec = |m: &MatrixName| match chosen.get(m.name) {
        Some(c) => c.spec(m.rows, m.cols),
        None => spec(m, plan),
    };
    let config_path = dir.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let tokenizer = match TokenizerFiles::read_dir(dir) {
        Ok(files) => Some(files),
        Err(ModelError::Tokenizer(TokenizerError::Missing { .. })) => None,
        Err(e) => return Err(e),
    };

    // The layout first: every size follows from the config and the plan.
    // (The two callbacks of `build` share state through cells.)
    let layout = RefCell::new(Plan::new());
    let total = Cell::new(0);
    Weights::<(), ()>::build(
        &ckpt.config,
        |m| {
            total.set(total.get() + m.rows * m.cols);
            layout.borrow_mut().matrix(m.name, spec(&m));
            Ok::<(), ModelError>(())
        },
        |name, len| {
            total.set(total.get() + len);
            layout.borrow_mut().f32(name, &[len]);
            Ok(())
        },
    )?;
    let (mut layout, total) = (layout.into_inner(), total.get());
    if let Some(files) = &tokenizer {
        for (name, bytes) in files.entries() {
            layout.bytes(format!("{TOKENIZER_PREFIX}{name}"), bytes.len());
        }
    }
    layout.metadata(CONFIG_KEY, config_text);
    let mut codecs = format!(
        "linear={} embed={} lm_head={} sparse_group={} q4_group={}",
        plan.linear.name(),
        plan.embed.name(),
        plan.lm_head.name(),
        plan.sparse_group,
        plan.q4_group
    );
    if let Some(b) = bits {
        codecs.push_str(&format!(
            " chosen_per_tensor_at_bits={b} ({} tensors)",
            chosen.len()
        ));
    }
    layout.metadata(CODECS_KEY, codecs);

    // Then the tensors, one at a time.
    let writer = RefCell::new(UpgWriter::create(out, &layout)?);
    let mut matrices = Vec::new();
    let done = Cell::new(0);
    Weights::<(), ()>::build(
        &ckpt.config,
        |m| {
            let norms = norms.and_then(|n| n.get(m.name));
            let t = match chosen.get(m.name) {
                Some(c) => {
                    let view = ckpt.matrix(m.name, m.rows, m.cols)?;
                    c.encode(&view.dense(), norms)
                        .map_err(|source| ModelError::Encode {
                            tensor: m.name.into(),
                            source,
                        })?
                }
                None => encode_from_checkpoint(ckpt, m, plan, norms)?,
            };
            writer.borrow_mut().put_matrix(m.name, &t)?;
            matrices.push((m.name.to_string(), t.codec(), t.shape(), t.bits_per_param()));
            done.set(done.get() + m.rows * m.cols);
            progress(Progress {
                done: done.get(),
                total,
                tensor: m.name,
                codec: t.codec(),
            });
            Ok::<(), ModelError>(())
        },
        |name, len| {
            writer
                .borrow_mut()
                .put_f32(name, &ckpt.vector(name, len)?)?;
            done.set(done.get() + len);
            Ok(())
        },
    )?;
    let mut writer = writer.into_inner();
    if let Some(files) = &tokenizer {
        for (name, bytes) in files.entries() {
            writer.put_bytes(&format!("{TOKENIZER_PREFIX}{name}"), bytes)?;
        }
    }
    writer.finish()?;
    let file_bytes = std::fs::metadata(out)
        .map_err(|e| ModelError::io(out, e))?
        .len();
    Ok(Converted {
        matrices,
        params: total,
        file_bytes,
        tokenizer: tokenizer.is_some(),
    })
}

/// A model read from a .upg file: weights stay memory-mapped where the file allows.
pub struct UpgModel {
    pub config: Config,
    pub weights: HostWeights,
    /// `None` when the file was converted from a folder without tokenizer files.
    pub tokenizer: Option<TokenizerFiles>,
    pub file: UpgFile,
}

/// Opens a .upg model file written by [`convert`] (every field is validated on open).
pub fn load(path: &Path) -> Result<UpgModel> {
    let file = UpgFile::open(path)?;
    let text = file.metadata().get(CONFIG_KEY).ok_or_else(|| {
        ModelError::Config(format!(
            "{}: no model config in the file (metadata '{CONFIG_KEY}'): it was not written by upg's convert",
            path.display()
        ))
    })?;
    let config = Config::from_json(text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    let weights = Weights::build(
        &config,
        |m| -> Result<Tensor> {
            let t = file.matrix(m.name)?;
            if t.shape() != [m.rows, m.cols] {
                return Err(ModelError::Config(format!(
                    "{}: matrix '{}' has shape {:?}, the config needs [{}, {}]",
                    path.display(),
                    m.name,
                    t.shape(),
                    m.rows,
                    m.cols
                )));
            }
            Ok(t)
        },
        |name, len| {
            let v = file.f32(name)?;
            if v.len() != len {
                return Err(ModelError::Config(format!(
                    "{}: vector '{name}' has {} values, the config needs {len}",
                    path.display(),
                    v.len()
                )));
            }
            Ok(v.to_vec())
        },
    )?;
    let blob = |name: &str| file.bytes(&format!("{TOKENIZER_PREFIX}{name}")).ok();
    let text = |name: &str| blob(name).map(|b| String::from_utf8_lossy(b).into_owned());
    let [tok, tok_config, template, gen] = TokenizerFiles::NAMES;
    let tokenizer = blob(tok).map(|t| TokenizerFiles {
        tokenizer: t.to_vec(),
        tokenizer_config: text(tok_config),
        chat_template: text(template),
        generation_config: text(gen),
    });
    Ok(UpgModel {
        config,
        weights,
        tokenizer,
        file,
    })
}
