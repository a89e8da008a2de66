//! config.json parsing over arbitrary text. Parsing gives a config or an error, never a panic; an
//! accepted config's sizes multiply without overflow (debug assertions are on in fuzz builds), and
//! its RoPE tables are finite at every position up to max_position_embeddings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upg::model::rope::{self, FactorSet, RopeTable};
use upg::model::{AttentionShape, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = Config::from_json(text) else {
        return;
    };
    let _ = (c.parameters(), c.qkv_dim(), c.rotary_dim());
    let last = c.max_position_embeddings - 1;
    let shape = AttentionShape::new(&c, c.max_position_embeddings);
    let _ = (shape.first_key(last), shape.qkv_dim());
    let scale = rope::attention_scaling(&c);
    for set in [FactorSet::Short, FactorSet::Long] {
        for f in rope::inv_freq(&c, set) {
            for pos in [1, last] {
                let (s, co) = (pos as f64 * f).sin_cos();
                let (s, co) = ((s * scale) as f32, (co * scale) as f32);
                assert!(s.is_finite() && co.is_finite(), "{set:?}: {f} at {pos}, scale {scale}");
            }
        }
        let t = RopeTable::new(&c, set, c.max_position_embeddings.min(4));
        assert!(t.cos.iter().chain(&t.sin).all(|v| v.is_finite()));
    }
});
