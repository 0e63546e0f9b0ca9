//! PyTorch's CPU random stream, where an adapter's weights are regenerated from a seed at load
//! time instead of being saved (FourierFT's frequency locations).
//!
//! `torch.Generator().manual_seed(s)` seeds a standard 32-bit Mersenne Twister (MT19937, the
//! reference initialisation with the seed truncated to 32 bits), and `torch.randperm(n, generator=g)`
//! on the CPU is a Fisher–Yates shuffle of `0..n` drawing `random() % (n − i)` for `i` in
//! `0..n−1` (for `n` below `u32::MAX / 20`; larger `n` are refused). The tests pin the outputs
//! against values torch 2.15 printed.

/// MT19937, 32-bit output.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// Seed as `std::mt19937(seed)` and torch's `mt19937(seed)` do.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            state[i] = 1_812_433_253u32
                .wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// `tensor.uniform_(-bound, bound)` on a bf16 CPU tensor followed by nothing else, as
/// `kaiming_uniform_(a=√5)` does for a tensor with `fan_in` inputs: each value takes one 32-bit
/// draw, `x = (u & 0xFFFFFF)·2⁻²⁴`, `v = fma(x, hi − lo, lo)` in f32, rounded to bf16 (nearest
/// even), and a value equal to `bf16(hi)` becomes `bf16(lo)`. Returned as f32.
pub fn kaiming_uniform_bf16(g: &mut Mt19937, n: usize, fan_in: usize) -> Vec<f32> {
    let gain = (2.0f64 / (1.0 + 5.0)).sqrt();
    let bound = 3.0f64.sqrt() * (gain / (fan_in as f64).sqrt());
    let (lo, hi) = (-bound as f32, bound as f32);
    let width = (hi - lo) as f64;
    let to_bf16 = |v: f32| half::bf16::from_f32(v);
    let (lo_b, hi_b) = (to_bf16(lo), to_bf16(hi));
    (0..n)
        .map(|_| {
            let x = (g.next_u32() & 0x00ff_ffff) as f64 * (1.0 / 16_777_216.0);
            let v = (x * width + lo as f64) as f32;
            let b = to_bf16(v);
            if b == hi_b {
                lo_b.to_f32()
            } else {
                b.to_f32()
            }
        })
        .collect()
}

/// PEFT's `t / t.std()` on a bf16 tensor: the unbiased standard deviation (computed wide, rounded to
/// bf16), then each value divided in f32 and rounded to bf16.
pub fn div_std_bf16(t: &[f32]) -> Vec<f32> {
    let n = t.len() as f64;
    let mean = t.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = t.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let sd = half::bf16::from_f64(var.sqrt()).to_f32();
    t.iter()
        .map(|&x| half::bf16::from_f32(x / sd).to_f32())
        .collect()
}

/// The first `k` entries of [`randperm`]`(n, seed)`, in `O(k)` time and memory: entry `i` of a
/// Fisher–Yates shuffle is final once step `i` has run, and the steps touch only the positions
/// they swap, which a sparse map holds.
pub fn randperm_prefix(n: u64, k: usize, seed: u64) -> Option<Vec<u64>> {
    if !randperm_supported(n) || k as u64 > n {
        return None;
    }
    let mut g = Mt19937::new(seed);
    let mut moved: std::collections::HashMap<u64, u64> =
        std::collections::HashMap::with_capacity(2 * k);
    let mut out = Vec::with_capacity(k);
    for i in 0..k as u64 {
        if i + 1 >= n {
            // The last position is never swapped by torch's loop (it stops at n − 2).
            out.push(*moved.get(&i).unwrap_or(&i));
            break;
        }
        let z = u64::from(g.next_u32()) % (n - i);
        let j = i + z;
        let vi = *moved.get(&i).unwrap_or(&i);
        let vj = *moved.get(&j).unwrap_or(&j);
        moved.insert(j, vi);
        out.push(vj);
    }
    Some(out)
}

/// Whether [`randperm`] reproduces torch for this `n`.
pub fn randperm_supported(n: u64) -> bool {
    n < u64::from(u32::MAX / 20)
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU, or `None` for
/// an `n` whose torch code path this does not reproduce.
pub fn randperm(n: u64, seed: u64) -> Option<Vec<u64>> {
    if !randperm_supported(n) {
        return None;
    }
    let mut g = Mt19937::new(seed);
    let mut r: Vec<u64> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let z = u64::from(g.next_u32()) % (n - i);
        r.swap(i as usize, (z + i) as usize);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_mt19937() {
        // The 10000th output of std::mt19937 with the default seed 5489 (C++ standard).
        let mut g = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn prefix_equals_full_permutation() {
        for (n, seed, k) in [
            (10u64, 0u64, 10usize),
            (1024, 777, 20),
            (1 << 20, 5, 1000),
            (7, 3, 6),
            (1, 9, 1),
        ] {
            let full = randperm(n, seed).unwrap();
            assert_eq!(
                randperm_prefix(n, k, seed).unwrap(),
                full[..k],
                "n={n} seed={seed} k={k}"
            );
        }
    }

    #[test]
    fn matches_torch_randperm() {
        // torch 2.15: torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:8], sum.
        let cases: [(u64, u64, [u64; 8]); 5] = [
            (10, 0, [4, 1, 7, 5, 3, 9, 0, 8]),
            (1024, 777, [103, 249, 319, 701, 999, 360, 217, 998]),
            (2048, 2024, [1672, 924, 966, 153, 907, 442, 350, 839]),
            (1000, 42, [542, 618, 816, 68, 94, 215, 60, 585]),
            (
                1 << 20,
                5,
                [
                    297827, 18865, 551885, 134823, 760098, 915856, 683458, 873981,
                ],
            ),
        ];
        for (n, seed, first) in cases {
            let p = randperm(n, seed).unwrap();
            assert_eq!(&p[..8], &first, "n={n} seed={seed}");
            assert_eq!(p.iter().sum::<u64>(), n * (n - 1) / 2);
        }
    }
}
