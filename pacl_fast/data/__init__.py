"""Data: the synthetic scene world, image-caption pairs, benchmark readers (``segmentation``), class-name
files (``names``) and ImageFolder (``classification``)."""
