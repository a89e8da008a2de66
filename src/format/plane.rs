//! One array of a stored tensor (masks, codes, scales, values): owned, or borrowed from a mapped file.
//!
//! Mapping lets a multi-gigabyte model open without copying; the writer orders planes by alignment so
//! that every mapped plane is aligned for its element type (checked when the plane is made).

use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::Mmap;

pub enum Plane<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        /// Byte offset of the first element inside the map.
        offset: usize,
        /// Number of elements.
        len: usize,
    },
}

impl<T: Pod> Plane<T> {
    /// Borrow `len` elements at byte `offset` of `map`, or `None` when the range falls outside the
    /// map or is not aligned for `T`.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let slice = map.get(offset..end)?;
        bytemuck::try_cast_slice::<u8, T>(slice).ok()?;
        Some(Plane::Mapped { map, offset, len })
    }

    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

impl<T: Pod> Deref for Plane<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Plane::Owned(v) => v,
            Plane::Mapped { map, offset, len } => {
                // Range and alignment were checked in `Plane::mapped`, so this cast cannot fail.
                bytemuck::cast_slice(&map[*offset..*offset + *len * std::mem::size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> From<Vec<T>> for Plane<T> {
    fn from(v: Vec<T>) -> Self {
        Plane::Owned(v)
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for Plane<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Plane::Owned(_) => "owned",
            Plane::Mapped { .. } => "mapped",
        };
        write!(
            f,
            "Plane<{}>({kind}, {} elements)",
            std::any::type_name::<T>(),
            self.len()
        )
    }
}
