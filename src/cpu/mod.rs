//! CPU kernels: the plain scalar reference, and the fast SIMD + multi-core kernels the library uses
//! when no GPU is there.

pub mod reference;
