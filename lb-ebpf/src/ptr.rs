//! Bounds-checked access to packet memory.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_ebpf::parse::Frame;

/// The frame of an `XdpContext`. Holds `data`/`data_end` as read at
/// construction; rebuild it after any head or tail adjustment.
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// A mutable pointer to the `T` at `off`, if all of it lies inside the frame.
    #[inline(always)]
    pub fn at_mut<T>(&self, off: usize) -> Option<*mut T> {
        if self.start + off + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + off) as *mut T)
    }
}

impl Frame for Packet {
    #[inline(always)]
    fn at<T>(&self, off: usize) -> Option<&T> {
        // SAFETY: in bounds of the frame, which lives as long as the program
        // runs; packet headers are plain bytes, any value is valid.
        self.at_mut::<T>(off).map(|p| unsafe { &*p })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }
}
