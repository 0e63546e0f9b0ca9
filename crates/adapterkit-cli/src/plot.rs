//! A small PNG line chart: energy kept against rank, one line per module type.

use std::path::Path;

use anyhow::{Context, Result};
use font8x8::{UnicodeFonts, BASIC_FONTS};

const W: usize = 900;
const H: usize = 560;
const LEFT: usize = 70;
const RIGHT: usize = 200;
const TOP: usize = 40;
const BOTTOM: usize = 60;

const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn dot(&mut self, x: i64, y: i64, c: [u8; 3], r: i64) {
        for dy in -r..=r {
            for dx in -r..=r {
                if dx * dx + dy * dy <= r * r {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    /// A line of width `2r+1` (Bresenham with a round brush).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], r: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.dot(x, y, c, r);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let glyph = BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + (k * 8 + col) as i64, y + row as i64, c);
                    }
                }
            }
        }
    }

    fn text_vertical(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        // Bottom to top.
        for (k, ch) in s.chars().enumerate() {
            let glyph = BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + row as i64, y - (k * 8 + col) as i64, c);
                    }
                }
            }
        }
    }
}

/// One line: a label and `energy[k]` = fraction of energy kept at rank `k + 1`.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Energy kept at ranks 1, 2, ….
    pub energy: Vec<f64>,
}

/// Draw the chart and write it as a PNG.
pub fn energy_chart(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let mut c = Canvas::new();
    let max_rank = series
        .iter()
        .map(|s| s.energy.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let xmap = |k: f64| LEFT as i64 + (k / max_rank as f64 * pw).round() as i64;
    let ymap = |e: f64| (TOP as f64 + (1.0 - e.clamp(0.0, 1.0)) * ph).round() as i64;
    let grey = [200, 200, 200];
    let black = [0, 0, 0];
    // Grid and y ticks.
    for i in 0..=10 {
        let e = i as f64 / 10.0;
        let y = ymap(e);
        c.line((LEFT as i64, y), ((W - RIGHT) as i64, y), grey, 0);
        c.text(LEFT as i64 - 36, y - 4, &format!("{:.1}", e), black);
    }
    // x ticks at "nice" steps.
    let step = [
        1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 200, 256, 500, 512, 1000,
    ]
    .into_iter()
    .find(|s| max_rank / s <= 10)
    .unwrap_or(max_rank.div_ceil(10).max(1));
    let mut k = 0;
    while k <= max_rank {
        let x = xmap(k as f64);
        c.line((x, TOP as i64), (x, (H - BOTTOM) as i64), grey, 0);
        let label = k.to_string();
        c.text(
            x - 4 * label.len() as i64,
            (H - BOTTOM) as i64 + 8,
            &label,
            black,
        );
        k += step;
    }
    // Axes.
    c.line(
        (LEFT as i64, TOP as i64),
        (LEFT as i64, (H - BOTTOM) as i64),
        black,
        0,
    );
    c.line(
        (LEFT as i64, (H - BOTTOM) as i64),
        ((W - RIGHT) as i64, (H - BOTTOM) as i64),
        black,
        0,
    );
    c.text(LEFT as i64, 14, title, black);
    c.text(
        (LEFT + (W - LEFT - RIGHT) / 2) as i64 - 16,
        (H - BOTTOM) as i64 + 28,
        "rank",
        black,
    );
    c.text_vertical(
        14,
        (TOP + (H - TOP - BOTTOM) / 2) as i64 + 48,
        "energy kept",
        black,
    );
    for (i, s) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        let mut prev = (xmap(0.0), ymap(0.0));
        for (k, e) in s.energy.iter().enumerate() {
            let p = (xmap((k + 1) as f64), ymap(*e));
            c.line(prev, p, col, 1);
            prev = p;
        }
        // Legend.
        let ly = (TOP + 10 + 18 * i) as i64;
        let lx = (W - RIGHT + 16) as i64;
        c.line((lx, ly + 4), (lx + 20, ly + 4), col, 2);
        let label: String = s.label.chars().take(20).collect();
        c.text(lx + 28, ly, &label, black);
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().context("encoding the PNG")?;
        w.write_image_data(&c.px).context("encoding the PNG")?;
        w.finish().context("encoding the PNG")?;
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, &bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
