//! Part 4: Maglev's quality (issue #4): how evenly a table is shared, and
//! how little of it moves when a backend goes.

use std::collections::HashMap;

use lb_common::BackendId;
use xlb::control::maglev::{self, Entry};

use super::{
    Opts,
    report::{Row, Section},
};

pub const M: u32 = 65_537;

/// `n` backend identities (addresses as text), set number `set`.
pub fn names(n: usize, set: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.{}.{}.{}", 10 + set, (i >> 8) & 255, i & 255)).collect()
}

pub fn entries(names: &[String]) -> Vec<Entry<'_>> {
    names.iter().enumerate().map(|(i, n)| Entry { identity: n, id: i as BackendId + 1, weight: 1 }).collect()
}

fn shares(table: &[BackendId]) -> HashMap<BackendId, usize> {
    let mut c = HashMap::new();
    for &id in table {
        *c.entry(id).or_default() += 1;
    }
    c
}

pub fn run(_opts: &Opts) -> anyhow::Result<Section> {
    const SETS: usize = 5;
    let mut section = Section::new(
        "4. Maglev quality (M = 65537, equal weights)",
        &format!(
            "Balance: largest share of table entries over the mean share (1 is perfect), over {SETS} \
             different backend address sets. Disruption: % of the entries held by surviving backends that \
             change owner when one backend is removed ({SETS} different backends removed; 0 is perfect, \
             the removed backend's own entries must move). Build time for N = 1000: part 3."
        ),
    );
    for n in [3usize, 10, 100, 1000] {
        let samples: Vec<f64> = (0..SETS)
            .map(|set| {
                let names = names(n, set);
                let table = maglev::build(&entries(&names), M);
                let max = shares(&table).values().copied().max().unwrap_or(0) as f64;
                max / (M as f64 / n as f64)
            })
            .collect();
        section.push(Row::new(format!("balance max/mean, N = {n}"), "ratio", samples));
    }
    for n in [10usize, 100, 1000] {
        let names = names(n, 0);
        let all = entries(&names);
        let before = maglev::build(&all, M);
        let samples: Vec<f64> = (0..SETS)
            .map(|k| {
                let removed = all[(2 * k + 1) * n / (2 * SETS)].id;
                let rest: Vec<Entry<'_>> = all.iter().copied().filter(|e| e.id != removed).collect();
                let after = maglev::build(&rest, M);
                let kept = before.iter().filter(|b| **b != removed).count();
                let moved = before.iter().zip(&after).filter(|(b, a)| **b != removed && b != a).count();
                100.0 * moved as f64 / kept as f64
            })
            .collect();
        section.push(Row::new(format!("disruption, 1 of N = {n} removed"), "%", samples));
    }
    Ok(section)
}
