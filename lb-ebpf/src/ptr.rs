//! Bounds-checked access to packet memory.

use core::mem::size_of;

use crate::parse::Frame;
use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::Reason;

/// The frame of an `XdpContext`. Resizing returns a new `Packet`: pointers
/// from before a resize are invalid.
pub struct Packet {
    ctx: *mut xdp_md,
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self::from_raw(ctx.ctx)
    }

    #[inline(always)]
    fn from_raw(ctx: *mut xdp_md) -> Self {
        // SAFETY: ctx is the program's context pointer, valid while it runs.
        unsafe {
            let start = core::ptr::read_volatile(&(*ctx).data) as usize;
            let end = core::ptr::read_volatile(&(*ctx).data_end) as usize;
            Self { ctx, start, end }
        }
    }

    /// The same frame, its pointers read afresh. After a call into a BPF
    /// function that could resize the packet the verifier forgets every
    /// packet pointer the caller held, even if nothing was resized.
    #[inline(always)]
    pub fn reload(&self) -> Packet {
        Self::from_raw(self.ctx)
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

    /// Copies `value` to `off`.
    #[inline(always)]
    pub fn write<T: Copy>(&self, off: usize, value: T) -> Result<(), Reason> {
        let p = self.at_mut::<T>(off).ok_or(Reason::DropMalformed)?;
        // SAFETY: in bounds; T is plain bytes (headers), unaligned write.
        unsafe { core::ptr::write_unaligned(p, value) };
        Ok(())
    }

    /// Grows (negative `delta`) or shrinks the frame at its start.
    #[inline(always)]
    pub fn adjust_head(&self, delta: i32) -> Result<Packet, Reason> {
        // SAFETY: the helper checks its arguments.
        if unsafe { bpf_xdp_adjust_head(self.ctx, delta) } != 0 {
            return Err(Reason::DropMalformed);
        }
        Ok(Self::from_raw(self.ctx))
    }

    /// Grows (positive `delta`) or shrinks the frame at its end.
    #[inline(always)]
    pub fn adjust_tail(&self, delta: i32) -> Result<Packet, Reason> {
        // SAFETY: the helper checks its arguments.
        if unsafe { bpf_xdp_adjust_tail(self.ctx, delta) } != 0 {
            return Err(Reason::DropMalformed);
        }
        Ok(Self::from_raw(self.ctx))
    }

    pub fn ctx(&self) -> *mut xdp_md {
        self.ctx
    }

    #[inline(always)]
    pub fn ingress_ifindex(&self) -> u32 {
        // SAFETY: as in from_raw.
        unsafe { (*self.ctx).ingress_ifindex }
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
