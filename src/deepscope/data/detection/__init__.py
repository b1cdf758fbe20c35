"""Detection data: annotation readers (COCO, VOC, YOLO, instance masks), box augmentation and batches."""
