"""The core: the adapter machinery every other layer builds on.

`layers` (the LayerTable of target Linears and its fingerprint), `lidb` (LiDB factors and their frozen aux bases),
`processors` (per-call deltas in the attention processors), `fusion` (bit-exact fuse/unfuse), `schedule` (low-noise
gains in sampling), `adapter` (the Adapter: one identity's deltas and their algebra), `formats` and `files` (native
and LoRA files, atomic safetensors I/O), `random_adapters` (seeded stand-ins). The core imports only the
foundations (`hyperdiff.errors`, `config`, `inputs`): never the hypernet, the pipeline, SynthFaces or the interfaces.
"""
