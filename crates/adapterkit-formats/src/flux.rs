//! Flux: Black Forest Labs' module names (what kohya's `lora_flux.py` trains on) against
//! diffusers' `FluxTransformer2DModel` names. BFL fuses q, k, v (and, in single blocks, the MLP
//! input) into one projection; diffusers keeps them apart. A LoRA on a fused module splits exactly
//! over the parts (the down projection is shared, the up projection's rows are cut), and LoRAs on
//! the parts fuse exactly into one of rank `Σ rᵢ` (down projections stacked, up projections
//! block-diagonal). The table is data: `(BFL pattern, diffusers parts)`, `{}` standing for the
//! block index.

use crate::base_names::ModelNames;

/// `(flattened BFL module, diffusers modules)`; several parts mean a fused projection whose rows
/// are the parts' rows in order. `~` in front of a part marks diffusers' swapped halves
/// (`norm_out.linear` stores BFL's `(shift, scale)` as `(scale, shift)`).
pub const TABLE: &[(&str, &[&str])] = &[
    (
        "double_blocks_{}_img_attn_qkv",
        &[
            "transformer_blocks.{}.attn.to_q",
            "transformer_blocks.{}.attn.to_k",
            "transformer_blocks.{}.attn.to_v",
        ],
    ),
    (
        "double_blocks_{}_txt_attn_qkv",
        &[
            "transformer_blocks.{}.attn.add_q_proj",
            "transformer_blocks.{}.attn.add_k_proj",
            "transformer_blocks.{}.attn.add_v_proj",
        ],
    ),
    (
        "double_blocks_{}_img_attn_proj",
        &["transformer_blocks.{}.attn.to_out.0"],
    ),
    (
        "double_blocks_{}_txt_attn_proj",
        &["transformer_blocks.{}.attn.to_add_out"],
    ),
    (
        "double_blocks_{}_img_mlp_0",
        &["transformer_blocks.{}.ff.net.0.proj"],
    ),
    (
        "double_blocks_{}_img_mlp_2",
        &["transformer_blocks.{}.ff.net.2"],
    ),
    (
        "double_blocks_{}_txt_mlp_0",
        &["transformer_blocks.{}.ff_context.net.0.proj"],
    ),
    (
        "double_blocks_{}_txt_mlp_2",
        &["transformer_blocks.{}.ff_context.net.2"],
    ),
    (
        "double_blocks_{}_img_mod_lin",
        &["transformer_blocks.{}.norm1.linear"],
    ),
    (
        "double_blocks_{}_txt_mod_lin",
        &["transformer_blocks.{}.norm1_context.linear"],
    ),
    (
        "single_blocks_{}_linear1",
        &[
            "single_transformer_blocks.{}.attn.to_q",
            "single_transformer_blocks.{}.attn.to_k",
            "single_transformer_blocks.{}.attn.to_v",
            "single_transformer_blocks.{}.proj_mlp",
        ],
    ),
    (
        "single_blocks_{}_linear2",
        &["single_transformer_blocks.{}.proj_out"],
    ),
    (
        "single_blocks_{}_modulation_lin",
        &["single_transformer_blocks.{}.norm.linear"],
    ),
    ("img_in", &["x_embedder"]),
    ("txt_in", &["context_embedder"]),
    (
        "time_in_in_layer",
        &["time_text_embed.timestep_embedder.linear_1"],
    ),
    (
        "time_in_out_layer",
        &["time_text_embed.timestep_embedder.linear_2"],
    ),
    (
        "vector_in_in_layer",
        &["time_text_embed.text_embedder.linear_1"],
    ),
    (
        "vector_in_out_layer",
        &["time_text_embed.text_embedder.linear_2"],
    ),
    (
        "guidance_in_in_layer",
        &["time_text_embed.guidance_embedder.linear_1"],
    ),
    (
        "guidance_in_out_layer",
        &["time_text_embed.guidance_embedder.linear_2"],
    ),
    ("final_layer_linear", &["proj_out"]),
    ("final_layer_adaLN_modulation_1", &["~norm_out.linear"]),
];

/// Match `flat` against a pattern with one `{}` standing for a block index.
fn matches(pattern: &str, flat: &str) -> Option<String> {
    match pattern.split_once("{}") {
        None => (pattern == flat).then(String::new),
        Some((pre, post)) => {
            let mid = flat.strip_prefix(pre)?.strip_suffix(post)?;
            (!mid.is_empty() && mid.bytes().all(|b| b.is_ascii_digit())).then(|| mid.to_string())
        }
    }
}

/// The diffusers parts of BFL module `flat` in a base with diffusers Flux names: `(module, rows)`
/// in the fused order; `None` when `flat` is not a BFL Flux module or the base lacks a part.
/// A swapped part (`norm_out.linear`) is reported with its module name prefixed by `~`.
pub fn split_for(flat: &str, names: &ModelNames) -> Option<Vec<(String, u64)>> {
    for (pattern, parts) in TABLE {
        let Some(i) = matches(pattern, flat) else {
            continue;
        };
        let mut out = Vec::new();
        for p in *parts {
            let (swap, p) = match p.strip_prefix('~') {
                Some(p) => (true, p),
                None => (false, *p),
            };
            let module = p.replace("{}", &i);
            let rows = *names.shape(&format!("{module}.weight"))?.first()?;
            out.push((if swap { format!("~{module}") } else { module }, rows));
        }
        return Some(out);
    }
    None
}

/// The BFL module (flattened) that diffusers module `module` belongs to, with the part's index
/// and the number of parts: the inverse of [`TABLE`].
pub fn fused_for(module: &str) -> Option<(String, usize, usize)> {
    for (pattern, parts) in TABLE {
        for (k, p) in parts.iter().enumerate() {
            let p = p.trim_start_matches('~');
            let Some(i) = matches(&p.replace('.', "\u{1}"), &module.replace('.', "\u{1}")) else {
                continue;
            };
            return Some((pattern.replace("{}", &i), k, parts.len()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_block_indices() {
        assert_eq!(
            matches(
                "double_blocks_{}_img_attn_qkv",
                "double_blocks_12_img_attn_qkv"
            ),
            Some("12".into())
        );
        assert_eq!(
            matches(
                "double_blocks_{}_img_attn_qkv",
                "double_blocks__img_attn_qkv"
            ),
            None
        );
        assert_eq!(
            fused_for("single_transformer_blocks.3.proj_mlp"),
            Some(("single_blocks_3_linear1".into(), 3, 4))
        );
        assert_eq!(
            fused_for("transformer_blocks.0.attn.to_out.0"),
            Some(("double_blocks_0_img_attn_proj".into(), 0, 1))
        );
    }
}
