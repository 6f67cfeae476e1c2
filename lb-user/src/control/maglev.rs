//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI '16).
//!
//! Each backend walks its own permutation of the table's M slots, derived
//! from two hashes of its stable identity, and claims the first free slot
//! on each of its turns. Turns are handed out in proportion to weight.
//! The result depends only on the set of (identity, weight) pairs, never
//! on input order, so every xlb node builds byte-identical tables.

use lb_common::{BackendId, NO_BACKEND};

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// Stable identity (e.g. the address as text); decides the permutation.
    pub identity: &'a str,
    pub id: BackendId,
    /// 0 takes no slots.
    pub weight: u32,
}

/// Builds a table of `m` slots (m prime). Without backends of non-zero
/// weight every slot is `NO_BACKEND`.
pub fn build(entries: &[Entry<'_>], m: u32) -> Vec<BackendId> {
    let mut entries: Vec<&Entry<'_>> = entries.iter().filter(|e| e.weight > 0).collect();
    let mut table = vec![NO_BACKEND; m as usize];
    if entries.is_empty() || m < 2 {
        return table;
    }
    entries.sort_by(|a, b| a.identity.cmp(b.identity).then(a.id.cmp(&b.id)));

    let m64 = m as u64;
    // Current position and step of each backend's permutation.
    let mut walk: Vec<(usize, usize)> = entries
        .iter()
        .map(|e| {
            let h = fnv1a(e.identity.as_bytes());
            let offset = mix(h ^ 0x6d61_676c_6576_3031) % m64;
            let skip = mix(h ^ 0x736b_6970_7374_6570) % (m64 - 1) + 1;
            (offset as usize, skip as usize)
        })
        .collect();
    let m = m as usize;
    let max_weight = entries.iter().map(|e| e.weight as u64).max().unwrap_or(1);
    let mut credit = vec![0u64; entries.len()];
    let mut filled = 0usize;
    loop {
        for (i, entry) in entries.iter().enumerate() {
            credit[i] += entry.weight as u64;
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                let (pos, skip) = &mut walk[i];
                while table[*pos] != NO_BACKEND {
                    *pos = step(*pos, *skip, m);
                }
                table[*pos] = entry.id;
                *pos = step(*pos, *skip, m);
                filled += 1;
                if filled == table.len() {
                    return table;
                }
            }
        }
    }
}

/// `(pos + skip) % m` for `pos, skip < m`, without the division that
/// dominated the build.
#[inline(always)]
fn step(pos: usize, skip: usize, m: usize) -> usize {
    let next = pos + skip;
    if next >= m { next - m } else { next }
}

/// 64-bit FNV-1a: fixed forever, so tables agree across versions and nodes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64 finalizer: spreads FNV's weak low bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const M: u32 = 65_537;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)).collect()
    }

    fn equal(names: &[String]) -> Vec<Entry<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Entry { identity: n, id: i as BackendId + 1, weight: 1 })
            .collect()
    }

    fn counts(table: &[BackendId]) -> HashMap<BackendId, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_default() += 1;
        }
        c
    }

    #[test]
    fn every_slot_filled_and_balanced() {
        for n in [1usize, 3, 10, 100, 1000] {
            let names = names(n);
            let table = build(&equal(&names), M);
            let c = counts(&table);
            assert!(!c.contains_key(&NO_BACKEND), "n={n}: empty slot");
            assert_eq!(c.len(), n, "n={n}: every backend gets slots");
            let max = *c.values().max().unwrap() as f64;
            let mean = M as f64 / n as f64;
            assert!(max / mean <= 1.01, "n={n}: max/mean = {}", max / mean);
        }
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let names = names(50);
        let mut entries = equal(&names);
        let a = build(&entries, M);
        entries.reverse();
        entries.swap(3, 17);
        assert_eq!(a, build(&entries, M));
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        for n in [10usize, 100, 1000] {
            let names = names(n);
            let all = equal(&names);
            let before = build(&all, M);
            let removed = all[n / 2].id;
            let rest: Vec<_> = all.iter().copied().filter(|e| e.id != removed).collect();
            let after = build(&rest, M);
            let moved = before.iter().zip(&after).filter(|(b, a)| **b != removed && b != a).count();
            assert!((moved as f64) < 0.01 * M as f64, "n={n}: {moved} slots of surviving backends moved");
            assert_eq!(build(&all, M), before, "adding it back restores the table");
        }
    }

    #[test]
    fn weights_are_proportional_within_one_percent() {
        let names = names(10);
        let mut entries = equal(&names);
        for (i, e) in entries.iter_mut().enumerate() {
            e.weight = [1, 2, 3, 5, 10][i % 5];
        }
        let total: u32 = entries.iter().map(|e| e.weight).sum();
        let c = counts(&build(&entries, M));
        for e in &entries {
            let fair = M as f64 * e.weight as f64 / total as f64;
            let off = (c[&e.id] as f64 - fair).abs() / fair;
            assert!(off <= 0.01, "weight {} got {} entries, fair {fair:.0}", e.weight, c[&e.id]);
        }
    }

    #[test]
    fn zero_weight_and_empty_sets_leave_no_backend() {
        let names = names(2);
        let mut entries = equal(&names);
        entries[0].weight = 0;
        let c = counts(&build(&entries, M));
        assert_eq!(c.len(), 1);
        assert_eq!(c[&entries[1].id], M as usize);
        assert!(build(&[], 7).iter().all(|&id| id == NO_BACKEND));
    }

    /// Nodes and versions must build identical tables: these digests pin
    /// every entry of a few weighted tables, as first built with a plain
    /// `% m` walk.
    #[test]
    fn tables_never_change() {
        let names = names(1000);
        let mut entries = equal(&names);
        for (i, e) in entries.iter_mut().enumerate() {
            e.weight = [1, 2, 3, 5, 10][i % 5];
        }
        let pinned: [(usize, u32, u64, [BackendId; 7]); 5] = [
            (1, 7, 0x4b7b_dd80_6bfa_a73c, [1, 1, 1, 1, 1, 1, 1]),
            (3, 13, 0x424d_9514_ed28_bbde, [2, 2, 3, 3, 2, 3, 3]),
            (10, 251, 0xe58a_511c_6bc7_a477, [3, 5, 5, 5, 8, 10, 9]),
            (100, M, 0xa468_c788_761f_e400, [74, 64, 95, 100, 78, 80, 99]),
            (1000, M, 0xb90f_ba4d_06f7_55d0, [511, 919, 605, 610, 729, 245, 685]),
        ];
        for (n, m, digest, first) in pinned {
            let table = build(&entries[..n], m);
            let bytes: Vec<u8> = table.iter().flat_map(|id| id.to_le_bytes()).collect();
            assert_eq!(table[..7], first, "n={n} m={m}");
            assert_eq!(fnv1a(&bytes), digest, "n={n} m={m}");
        }
    }
}
