//! The UPG format: codecs that turn dense weights into compact planes, and the .upg file that holds
//! them.

pub mod dense;
pub mod error;
pub mod file;
pub mod plane;
pub mod quant;
pub mod sparse;

use half::{bf16, f16};

pub use dense::{DenseF16, DenseF32, Q3Matrix, Q4Matrix};
pub use error::{FormatError, Result};
pub use file::{MatrixSpec, Plan, UpgFile, UpgWriter};
pub use plane::Plane;
pub use quant::Grid;
pub use sparse::SparseMatrix;

/// Dense weights as they come from a checkpoint: row-major [rows, cols] in one of the usual dtypes.
#[derive(Clone, Copy, Debug)]
pub struct Dense<'a> {
    pub rows: usize,
    pub cols: usize,
    pub data: DenseData<'a>,
}

#[derive(Clone, Copy, Debug)]
pub enum DenseData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Dense<'a> {
    pub fn new(rows: usize, cols: usize, data: DenseData<'a>) -> Result<Self> {
        let len = match data {
            DenseData::F32(d) => d.len(),
            DenseData::F16(d) => d.len(),
            DenseData::BF16(d) => d.len(),
        };
        if Some(len) != rows.checked_mul(cols) {
            return Err(FormatError::Shape(format!(
                "{len} values given for a [{rows}, {cols}] matrix"
            )));
        }
        Ok(Self { rows, cols, data })
    }

    pub fn f32(rows: usize, cols: usize, data: &'a [f32]) -> Result<Self> {
        Self::new(rows, cols, DenseData::F32(data))
    }

    /// Row `r` as f32 in `out`; refuses NaN and infinities, naming the element.
    pub fn row_f32(&self, r: usize, out: &mut Vec<f32>) -> Result<()> {
        let range = r * self.cols..(r + 1) * self.cols;
        out.clear();
        match self.data {
            DenseData::F32(d) => out.extend_from_slice(&d[range]),
            DenseData::F16(d) => out.extend(d[range].iter().map(|v| v.to_f32())),
            DenseData::BF16(d) => out.extend(d[range].iter().map(|v| v.to_f32())),
        }
        match out.iter().position(|v| !v.is_finite()) {
            Some(col) => Err(FormatError::NonFinite {
                row: r,
                col,
                value: out[col],
            }),
            None => Ok(()),
        }
    }
}

/// How a tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// 50% balanced sparsity, 4-bit codes ([`SparseMatrix`]).
    Sparse,
    /// Dense f32 ([`DenseF32`]): exact, for reference runs and tiny tensors.
    F32,
    /// Dense f16 ([`DenseF16`]).
    F16,
    /// Dense 4-bit ([`Q4Matrix`]).
    Q4,
    /// Dense 3-bit ([`Q3Matrix`]).
    Q3,
}

impl Codec {
    /// The name written in the file's metadata.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Sparse => "sparse50_q4",
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Q4 => "q4",
            Codec::Q3 => "q3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Codec::Sparse, Codec::F32, Codec::F16, Codec::Q4, Codec::Q3]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// One stored weight matrix in any codec.
#[derive(Debug)]
pub enum Tensor {
    Sparse(SparseMatrix),
    F32(DenseF32),
    F16(DenseF16),
    Q4(Q4Matrix),
    Q3(Q3Matrix),
}

impl Tensor {
    pub fn codec(&self) -> Codec {
        match self {
            Tensor::Sparse(_) => Codec::Sparse,
            Tensor::F32(_) => Codec::F32,
            Tensor::F16(_) => Codec::F16,
            Tensor::Q4(_) => Codec::Q4,
            Tensor::Q3(_) => Codec::Q3,
        }
    }

    /// [rows, cols]: outputs, inputs.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Tensor::Sparse(m) => [m.rows, m.cols],
            Tensor::F32(m) => [m.rows, m.cols],
            Tensor::F16(m) => [m.rows, m.cols],
            Tensor::Q4(m) => [m.rows, m.cols],
            Tensor::Q3(m) => [m.rows, m.cols],
        }
    }

    pub fn stored_bytes(&self) -> usize {
        match self {
            Tensor::Sparse(m) => m.stored_bytes(),
            Tensor::F32(m) => m.values.as_bytes().len(),
            Tensor::F16(m) => m.values.as_bytes().len(),
            Tensor::Q4(m) => m.stored_bytes(),
            Tensor::Q3(m) => m.stored_bytes(),
        }
    }

    /// All-in storage cost per logical parameter.
    pub fn bits_per_param(&self) -> f64 {
        let [r, c] = self.shape();
        self.stored_bytes() as f64 * 8.0 / (r * c).max(1) as f64
    }

    /// Scalar reference decode of row `r` into `out[..cols]`.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        match self {
            Tensor::Sparse(m) => m.decode_row(r, out),
            Tensor::F32(m) => m.decode_row(r, out),
            Tensor::F16(m) => m.decode_row(r, out),
            Tensor::Q4(m) => m.decode_row(r, out),
            Tensor::Q3(m) => m.decode_row(r, out),
        }
    }

    /// Checks plane sizes and contents against the shape; the error names the plane.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        match self {
            Tensor::Sparse(m) => m.validate(),
            Tensor::F32(m) => m.validate(),
            Tensor::F16(m) => m.validate(),
            Tensor::Q4(m) => m.validate(),
            Tensor::Q3(m) => m.validate(),
        }
    }
}
