//! The Phi-3 family (Phi-4, Phi-4-mini, Phi-3/3.5-mini): config, checkpoint loading, conversion, the
//! forward pass, KV cache, sampler and tokenizer glue.
