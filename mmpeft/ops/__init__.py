"""Tensor operations shared by the data and backbone layers (below both): point-cloud FPS, kNN and grouping."""

from mmpeft.ops.point import farthest_point_sample, full_precision, gather_points, group, knn

__all__ = ["farthest_point_sample", "full_precision", "gather_points", "group", "knn"]
