"""GenEval's object detector without mmcv: a PyTorch port of the inference path of mmdet's
Mask2Former (Swin-S, COCO instances), with module names that load the released mmdet 2.x checkpoint
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth`` as it is.
"""
