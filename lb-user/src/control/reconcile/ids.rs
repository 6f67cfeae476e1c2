//! Free VIP and backend ids.

use std::collections::VecDeque;

/// Free ids, handed out oldest-freed first so a freed id rests as long as
/// possible. Adoption cannot recover that order (the maps do not record
/// when an id was freed) and starts again from ascending ids; the
/// generation is what guarantees an old entry never reaches a new owner.
#[derive(Debug)]
pub(super) struct IdPool {
    free: VecDeque<u32>,
}

impl IdPool {
    pub fn new(ids: std::ops::Range<u32>) -> Self {
        Self { free: ids.collect() }
    }

    pub fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    /// Takes an id only if `reserved` stay free after it.
    pub fn take_leaving(&mut self, reserved: usize) -> Option<u32> {
        if self.free.len() > reserved { self.free.pop_front() } else { None }
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Takes `id` out of the pool; false if it was not free.
    pub fn reserve(&mut self, id: u32) -> bool {
        let found = self.free.iter().position(|&f| f == id);
        found.map(|i| self.free.remove(i)).is_some()
    }

    pub fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ids_come_back_last() {
        let mut pool = IdPool::new(1..4);
        assert_eq!(pool.take(), Some(1));
        assert!(pool.reserve(3) && !pool.reserve(3));
        pool.release(1);
        assert_eq!((pool.take(), pool.take(), pool.take()), (Some(2), Some(1), None));
    }
}
