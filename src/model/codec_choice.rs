//! The codec of each matrix chosen by measured error at a bit budget (`convert --bits B`).
//!
//! Every candidate codec is encoded, decoded, and its error measured against the original weights W.
//! With calibration inputs X (input rows of the matrix recorded by a calibration run, see
//! [`ActivationNorms::collect_sampled`]) the error is the relative output error
//! ||(W - W') X^T||_F / ||W X^T||_F, what the layer's outputs lose; without, the relative weight error
//! ||W - W'||_F / ||W||_F. A matrix gets the candidate of lowest error among those whose all-in bits
//! per parameter at its shape (codes, masks, scales, padding) are within the budget, so every chosen
//! matrix, and hence all matrices together, stay within it.
//!
//! The error is per matrix and relative, so it ranks codecs for one matrix; it says nothing about how
//! errors in different layers add up in the model's loss (QUALITY.md measures that).

use std::fmt;

use super::calibration::ActivationNorms;
use super::error::{ModelError, Result};
use super::weights::{MatrixName, Role};
use crate::cpu;
use crate::format::{
    self, Codec, Dense, DenseF16, DenseF32, MatrixSpec, Q3Matrix, Q4Matrix, SparseMatrix, Tensor,
};

/// One way to store a matrix: a codec, its scale group, and for the sparse codec whether weights are
/// ranked by Wanda's saliency |w| x ||x_col|| instead of |w|.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub codec: Codec,
    /// Columns per scale (sparse, q4, q3); `None` for f16 and f32.
    pub group: Option<usize>,
    pub wanda: bool,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.codec {
            Codec::Sparse => "sparse",
            other => other.name(),
        };
        write!(f, "{name}")?;
        if let Some(g) = self.group {
            write!(f, "/g{g}")?;
        }
        if self.wanda {
            write!(f, " wanda")?;
        }
        Ok(())
    }
}

impl Candidate {
    fn new(codec: Codec, group: Option<usize>) -> Self {
        Self {
            codec,
            group,
            wanda: false,
        }
    }

    /// Encodes `w`; `norms` (the input columns' activation norms) rank the sparse codec's weights
    /// when this candidate is Wanda's.
    pub fn encode(&self, w: &Dense, norms: Option<&[f32]>) -> format::Result<Tensor> {
        let group = || {
            self.group.ok_or_else(|| {
                format::FormatError::Parameter(format!("{self}: the codec needs a scale group"))
            })
        };
        Ok(match self.codec {
            Codec::F32 => Tensor::F32(DenseF32::encode(w)?),
            Codec::F16 => Tensor::F16(DenseF16::encode(w)?),
            Codec::Q4 => Tensor::Q4(Q4Matrix::encode(w, group()?)?),
            Codec::Q3 => Tensor::Q3(Q3Matrix::encode(w, group()?)?),
            Codec::Sparse => {
                let norms = if self.wanda { norms } else { None };
                Tensor::Sparse(SparseMatrix::encode(w, group()?, norms)?)
            }
        })
    }

    /// The file layout of a matrix of this shape in this codec.
    pub fn spec(&self, rows: usize, cols: usize) -> MatrixSpec {
        MatrixSpec {
            codec: self.codec,
            rows,
            cols,
            group: self.group,
        }
    }
}

/// The candidates for a matrix of `role`, Wanda's sparse ones only `with_wanda`. The embedding and an
/// untied lm_head get no sparse candidate: the GPU's embedding lookup reads dense codecs only.
pub fn candidates(role: Role, with_wanda: bool) -> Vec<Candidate> {
    let mut out = Vec::new();
    if role == Role::Linear {
        for group in [128, 64] {
            out.push(Candidate::new(Codec::Sparse, Some(group)));
            if with_wanda {
                out.push(Candidate {
                    wanda: true,
                    ..Candidate::new(Codec::Sparse, Some(group))
                });
            }
        }
    }
    for group in [128, 64, 32] {
        out.push(Candidate::new(Codec::Q3, Some(group)));
    }
    for group in [64, 32] {
        out.push(Candidate::new(Codec::Q4, Some(group)));
    }
    out.push(Candidate::new(Codec::F16, None));
    out.push(Candidate::new(Codec::F32, None));
    out
}

/// A candidate's cost and error on one matrix.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub candidate: Candidate,
    /// All-in bits per parameter at the matrix's shape.
    pub bits: f64,
    /// Relative output error (with calibration inputs) or relative weight error.
    pub error: f64,
}

/// What the choice saw for one matrix, and what it took.
#[derive(Clone, Debug)]
pub struct TensorChoice {
    pub name: String,
    pub shape: [usize; 2],
    /// Whether `error` is the output error on calibration inputs (else the weight error).
    pub output_error: bool,
    /// Every candidate, in the order of [`candidates`].
    pub measured: Vec<Measured>,
    /// Index of the chosen candidate in `measured`.
    pub chosen: usize,
}

impl TensorChoice {
    pub fn chosen(&self) -> &Measured {
        &self.measured[self.chosen]
    }
}

/// Error measurement for one matrix: W, and W X^T on the calibration inputs when there are some.
struct Reference<'a> {
    w: &'a Dense<'a>,
    /// Input rows, row-major [n, cols], and their count.
    inputs: Option<(&'a [f32], usize)>,
    /// ||W||_F^2 or ||W X^T||_F^2.
    norm2: f64,
}

fn sum_squares(v: &[f32]) -> f64 {
    v.iter().map(|&a| a as f64 * a as f64).sum()
}

fn cpu_error(e: cpu::CpuError) -> ModelError {
    ModelError::Choice(e.to_string())
}

impl<'a> Reference<'a> {
    fn new(w: &'a Dense<'a>, inputs: Option<&'a [f32]>) -> format::Result<Self> {
        let inputs = inputs.map(|x| (x, x.len() / w.cols.max(1)));
        let exact = DenseF32::encode(w)?;
        let norm2 = match inputs {
            Some((x, n)) => sum_squares(&product(&Tensor::F32(exact), x, n).map_err(|e| {
                format::FormatError::Parameter(format!("the product with the inputs failed: {e}"))
            })?),
            None => sum_squares(&exact.values),
        };
        Ok(Self { w, inputs, norm2 })
    }

    /// ||W - W'||_F / ||W||_F, or the same of W X^T: the difference is formed in f32 weight by
    /// weight before any product, so no cancellation between two large outputs enters.
    fn relative_error(&self, decoded: &Tensor) -> Result<f64> {
        let [rows, cols] = [self.w.rows, self.w.cols];
        let mut diff = vec![0.0f32; rows * cols];
        cpu::decompress_f32(decoded, &mut diff).map_err(cpu_error)?;
        let mut row = Vec::with_capacity(cols);
        for (r, d) in diff.chunks_mut(cols.max(1)).enumerate() {
            self.w.row_f32(r, &mut row)?;
            for (d, &w) in d.iter_mut().zip(&row) {
                *d = w - *d;
            }
        }
        let err2 = match self.inputs {
            Some((x, n)) => {
                let e = Tensor::F32(DenseF32 {
                    rows,
                    cols,
                    values: diff.into(),
                });
                sum_squares(&product(&e, x, n).map_err(cpu_error)?)
            }
            None => sum_squares(&diff),
        };
        Ok(if self.norm2 > 0.0 {
            (err2 / self.norm2).sqrt()
        } else {
            err2.sqrt()
        })
    }
}

/// The outputs of `m` for the `n` input rows `x` (row-major), output-major [n, rows].
fn product(m: &Tensor, x: &[f32], n: usize) -> cpu::Result<Vec<f32>> {
    let mut y = vec![0.0f32; n * m.shape()[0]];
    cpu::spmm(m, x, n, &mut y)?;
    Ok(y)
}

/// Encodes `w` with every candidate and measures each one's bits per parameter and error; `norms`
/// feed Wanda's candidates, `inputs` (row-major rows of `w.cols` values; none if empty) make the error
/// the output error.
pub fn measure(
    w: &Dense,
    candidates: &[Candidate],
    norms: Option<&[f32]>,
    inputs: Option<&[f32]>,
) -> Result<Vec<Measured>> {
    let inputs = inputs.filter(|x| !x.is_empty());
    if let Some(x) = inputs {
        if w.cols == 0 || x.len() % w.cols != 0 {
            return Err(ModelError::Choice(format!(
                "calibration inputs of {} values do not split into rows of {} columns",
                x.len(),
                w.cols
            )));
        }
    }
    let reference = Reference::new(w, inputs)?;
    candidates
        .iter()
        .map(|&candidate| {
            let t = candidate.encode(w, norms)?;
            Ok(Measured {
                candidate,
                bits: t.bits_per_param(),
                error: reference.relative_error(&t)?,
            })
        })
        .collect()
}

/// The index of the lowest-error candidate within `bits` per parameter (the fewer bits on a tie), or
/// `None` when none fits.
pub fn choose(measured: &[Measured], bits: f64) -> Option<usize> {
    measured
        .iter()
        .enumerate()
        .filter(|(_, m)| m.bits <= bits)
        .min_by(|(_, a), (_, b)| a.error.total_cmp(&b.error).then(a.bits.total_cmp(&b.bits)))
        .map(|(i, _)| i)
}

/// Measures and chooses the codec of matrix `m` with weights `w` under `bits` per parameter; `calib`
/// gives Wanda's norms and the output error's inputs where it has them for this matrix.
pub fn choose_for(
    m: &MatrixName,
    w: &Dense,
    bits: f64,
    calib: Option<&ActivationNorms>,
) -> Result<TensorChoice> {
    let norms = calib.and_then(|c| c.get(m.name));
    let inputs = calib.and_then(|c| c.inputs(m.name));
    let cands = candidates(m.role, norms.is_some());
    let measured = measure(w, &cands, norms, inputs).map_err(|e| match e {
        ModelError::Format(source) => ModelError::Encode {
            tensor: m.name.to_string(),
            source,
        },
        other => other,
    })?;
    let chosen = choose(&measured, bits).ok_or_else(|| {
        let least = measured
            .iter()
            .map(|c| c.bits)
            .fold(f64::INFINITY, f64::min);
        ModelError::Choice(format!(
            "{}: no codec fits {bits} bits per parameter (the smallest takes {least:.3} at shape [{}, {}]): give --bits {least:.3} or more",
            m.name, m.rows, m.cols
        ))
    })?;
    Ok(TensorChoice {
        name: m.name.to_string(),
        shape: [m.rows, m.cols],
        output_error: inputs.is_some(),
        measured,
        chosen,
    })
}
