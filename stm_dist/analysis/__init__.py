"""The paper's analyses of the token mixers beyond accuracy (stm-analyze):

    invariance   translation / rotation (before or after the crop) / scale: the original's
                 transforms and metrics (invariance.py, transforms.py)
    erf          effective receptive field of the last stage (erf.py)
    robustness   FGSM and PGD-l_inf in pixel space (robustness.py)

runner.py holds what they share (model loading, the shard reader, the exact-once work split),
plots.py their figures. Imports: stm_dist.data, stm_dist.models and the engine's plain
torch.distributed setup only; never DeepSpeed.
"""
