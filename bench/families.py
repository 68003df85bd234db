"""The architectures the conversion issue names, one per timm family: what the conversion
coverage (bench/convert.py) and the cost agreement survey (bench/cost.py) run over.

The bench scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path``.
"""

ISSUE_FAMILIES = (
    "resnet18",
    "resnet50d",
    "resnext50_32x4d",
    "seresnext26d_32x4d",
    "regnety_008",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "tf_efficientnet_b0",
    "mixnet_s",
    "ghostnet_100",
    "densenet121",
    "dla34",
    "hrnet_w18_small",
    "inception_v3",
    "xception41",
    "res2net50_14w_8s",
    "resnest14d",
    "cspdarknet53",
    "convnext_nano",
    "repvgg_a0",
    "rexnet_100",
    "nf_resnet26",
    "resnetv2_50x1_bit",
    "efficientnet_cc_b0_4e",
    "vit_tiny_patch16_224",
)
