"""Bundles whose network cannot be exported with ``torch.jit.script``, each with the reason.

Mirrors ``exclude_verify_torchscript_list`` of the model zoo's ``ci/bundle_custom_data.py``: the zoo's
``ci/verify_bundle.py`` exports every other bundle with ``ckpt_export`` defaults, i.e. by scripting, and
skips TorchScript for the listed ones (its generative bundles: brats_mri_*_generative_diffusion,
maisi_ct_generative). Here a listed bundle is traced instead, and ``ci/verify_bundle.py`` fails it if
scripting works after all, so an entry cannot outlive its reason. Keys are bundle folder names.
"""

exclude_verify_torchscript: dict[str, str] = {
    "aldm_translation": (
        "the VQ-GAN's forward takes a Python callable (latent_fn, the SPADE hook of training), which "
        "torch.jit.script cannot type, and ALDMFirstStage picks its MS-SPADE branch by a runtime target name "
        "from an nn.ModuleDict, which TorchScript indexes with string literals only"
    ),
    "maisi_ct": (
        "network_def is MONAI's DiffusionModelUNetMaisi, whose attention blocks "
        "(monai/networks/blocks/spatialattention.py) reshape with a starred shape that torch.jit.script "
        "rejects; the zoo lists maisi_ct_generative for the same network"
    ),
    "noddi_sr": (
        "network_def holds MONAI's DiffusionModelUNet (the latent denoiser; its attention blocks in "
        "monai/networks/blocks/spatialattention.py reshape with a starred shape that torch.jit.script rejects) "
        "and the VQ-GAN, whose forward takes a Python callable; scripting compiles every submodule, also those "
        "forward does not call"
    ),
}
