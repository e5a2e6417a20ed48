"""Ray actor classes of fuyou-ray: plain classes, wrapped with `ray.remote(...)` where they are created.

- `GPUComputeActor`  runs forward / recompute / backward unit by unit on the GPU (or the CPU fallback)
- `SSDIOActor`       owns the on-SSD tensor store and moves records between it and the ring
- `CPUOptimizerActor` runs fused AdamW over element ranges of ring slots (a pool of them)

Actors never import or call each other: they meet only through ring handles and the driver's futures.
"""
