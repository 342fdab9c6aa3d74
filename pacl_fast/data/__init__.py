"""Datasets: benchmark readers (``segmentation``), class-name files (``names``), ImageFolder (``classification``)."""
