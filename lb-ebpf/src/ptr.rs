//! Bounds-checked access to packet memory.

use core::mem::size_of;

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_ebpf::parse::Frame;

/// The frame of an `XdpContext`. Rebuild it after any head or tail
/// adjustment.
pub struct Packet {
    ctx: *mut xdp_md,
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            ctx: ctx.ctx,
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// A mutable pointer to the `T` at `off`, if all of it lies inside the frame.
    #[inline(always)]
    pub fn at_mut<T>(&self, off: usize) -> Option<*mut T> {
        // data_end is read afresh (volatile) for every check. Otherwise LLVM
        // may fold `start + off + n > end` into `off + n > end - start`,
        // a comparison of plain numbers from which the verifier learns
        // nothing about the pointer, and the load is rejected.
        // SAFETY: ctx is the program's context pointer, valid while it runs.
        let end = unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) } as usize;
        if self.start + off + size_of::<T>() > end {
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
