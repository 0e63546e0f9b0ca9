//! Stability's original (sgm/ldm) UNet names, which kohya sd-scripts trains SDXL on
//! (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), onto diffusers'
//! `UNet2DConditionModel` names — the mapping diffusers' own kohya loader applies
//! (`input_blocks.i.j` → `down_blocks.{(i−1)/(L+1)}.{resnets|attentions}.{(i−1)%(L+1)}` with `L`
//! layers per block, the last slot of a block its downsampler; `middle_block.0/1/2` →
//! `mid_block.resnets.0/attentions.0/resnets.1`; `output_blocks.i.j` → `up_blocks.{i/(L+1)}…`, the
//! upsampler after the attention when the block has one; resnet sub-layers renamed). Names are
//! flattened on both sides; the result is checked against the base's real module names.

use crate::base_names::ModelNames;

/// Resnet sub-layer names: `(sgm, diffusers)`, flattened.
const RESNET: &[(&str, &str)] = &[
    ("in_layers_0", "norm1"),
    ("in_layers_2", "conv1"),
    ("emb_layers_1", "time_emb_proj"),
    ("out_layers_0", "norm2"),
    ("out_layers_3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Top-level modules: `(sgm, diffusers)`, flattened.
const TOP: &[(&str, &str)] = &[
    ("input_blocks_0_0", "conv_in"),
    ("time_embed_0", "time_embedding_linear_1"),
    ("time_embed_2", "time_embedding_linear_2"),
    ("label_emb_0_0", "add_embedding_linear_1"),
    ("label_emb_0_2", "add_embedding_linear_2"),
    ("out_0", "conv_norm_out"),
    ("out_2", "conv_out"),
];

/// `"12_3_rest"` → `(12, 3, "rest")` (rest may be empty).
fn two_numbers(s: &str) -> Option<(usize, usize, &str)> {
    let (a, r) = s.split_once('_')?;
    let (b, rest) = r.split_once('_').unwrap_or((r, ""));
    Some((a.parse().ok()?, b.parse().ok()?, rest))
}

fn resnet_tail(tail: &str) -> String {
    for (s, d) in RESNET {
        if let Some(rest) = tail.strip_prefix(s) {
            return format!("{d}{rest}");
        }
    }
    tail.to_string()
}

/// Layers per block of the base UNet: the resnets of its first down block.
fn layers_per_block(names: &ModelNames) -> Option<usize> {
    (0..64)
        .take_while(|k| names.has(&format!("down_blocks.0.resnets.{k}.conv1.weight")))
        .last()
        .map(|k| k + 1)
}

fn has_attentions(names: &ModelNames, prefix: &str) -> bool {
    names
        .tensors
        .iter()
        .any(|(t, _)| t.starts_with(&format!("{prefix}.attentions.")))
}

/// The diffusers module that sgm module `flat` (flattened, without `lora_unet_`) is in a base
/// with diffusers UNet names; `None` when `flat` is not an sgm name or the base has no such module.
pub fn to_diffusers(flat: &str, names: &ModelNames) -> Option<String> {
    let join = |head: String, tail: &str| {
        if tail.is_empty() {
            head
        } else {
            format!("{head}_{tail}")
        }
    };
    let candidate = if let Some((_, d)) = TOP.iter().find(|(s, _)| *s == flat) {
        d.to_string()
    } else if let Some(rest) = flat.strip_prefix("input_blocks_") {
        let l = layers_per_block(names)?;
        let (i, j, tail) = two_numbers(rest)?;
        if i == 0 {
            return None;
        }
        let (block, layer) = ((i - 1) / (l + 1), (i - 1) % (l + 1));
        match (layer == l, j) {
            (true, 0) => join(
                format!("down_blocks_{block}_downsamplers_0"),
                &tail.replacen("op", "conv", 1),
            ),
            (false, 0) => join(
                format!("down_blocks_{block}_resnets_{layer}"),
                &resnet_tail(tail),
            ),
            (false, 1) => join(format!("down_blocks_{block}_attentions_{layer}"), tail),
            _ => return None,
        }
    } else if let Some(rest) = flat.strip_prefix("middle_block_") {
        let (j, tail) = rest.split_once('_').unwrap_or((rest, ""));
        match j {
            "0" => join("mid_block_resnets_0".into(), &resnet_tail(tail)),
            "1" => join("mid_block_attentions_0".into(), tail),
            "2" => join("mid_block_resnets_1".into(), &resnet_tail(tail)),
            _ => return None,
        }
    } else if let Some(rest) = flat.strip_prefix("output_blocks_") {
        let l = layers_per_block(names)?;
        let (i, j, tail) = two_numbers(rest)?;
        let (block, layer) = (i / (l + 1), i % (l + 1));
        let attn = has_attentions(names, &format!("up_blocks.{block}"));
        match (j, attn) {
            (0, _) => join(
                format!("up_blocks_{block}_resnets_{layer}"),
                &resnet_tail(tail),
            ),
            (1, true) => join(format!("up_blocks_{block}_attentions_{layer}"), tail),
            (1, false) | (2, true) => join(format!("up_blocks_{block}_upsamplers_0"), tail),
            _ => return None,
        }
    } else {
        return None;
    };
    match names.unflatten(&candidate) {
        [one] => Some(one.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_like() -> ModelNames {
        let mut t = Vec::new();
        for k in 0..2 {
            t.push(format!("down_blocks.0.resnets.{k}.conv1.weight"));
            t.push(format!("down_blocks.1.attentions.{k}.proj_in.weight"));
            t.push(format!(
                "up_blocks.0.attentions.{k}.transformer_blocks.0.attn1.to_q.weight"
            ));
        }
        t.push("down_blocks.0.downsamplers.0.conv.weight".into());
        t.push("up_blocks.0.upsamplers.0.conv.weight".into());
        t.push("up_blocks.1.resnets.0.time_emb_proj.weight".into());
        t.push("up_blocks.1.resnets.0.conv_shortcut.weight".into());
        t.push("mid_block.attentions.0.proj_out.weight".into());
        t.push("time_embedding.linear_1.weight".into());
        ModelNames::new(t.into_iter().map(|n| (n, vec![1])).collect())
    }

    #[test]
    fn sgm_names_map_onto_diffusers_blocks() {
        let n = sdxl_like();
        let m = |f: &str| to_diffusers(f, &n);
        assert_eq!(
            m("input_blocks_1_0_in_layers_2").as_deref(),
            Some("down_blocks.0.resnets.0.conv1")
        );
        assert_eq!(
            m("input_blocks_3_0_op").as_deref(),
            Some("down_blocks.0.downsamplers.0.conv")
        );
        assert_eq!(
            m("input_blocks_5_1_proj_in").as_deref(),
            Some("down_blocks.1.attentions.1.proj_in")
        );
        assert_eq!(
            m("middle_block_1_proj_out").as_deref(),
            Some("mid_block.attentions.0.proj_out")
        );
        assert_eq!(
            m("output_blocks_1_1_transformer_blocks_0_attn1_to_q").as_deref(),
            Some("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            m("output_blocks_2_2_conv").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv")
        );
        assert_eq!(
            m("output_blocks_3_0_emb_layers_1").as_deref(),
            Some("up_blocks.1.resnets.0.time_emb_proj")
        );
        assert_eq!(
            m("output_blocks_3_0_skip_connection").as_deref(),
            Some("up_blocks.1.resnets.0.conv_shortcut")
        );
        assert_eq!(
            m("time_embed_0").as_deref(),
            Some("time_embedding.linear_1")
        );
        assert_eq!(m("input_blocks_9_9_x"), None);
    }
}
