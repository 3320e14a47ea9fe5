"""The visual-search application: `scvnet-search index | query` (see `cli`), built on
`scvnet_jax.search` (indexes) and the retrieval engine, like eval.py and training."""
