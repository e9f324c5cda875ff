"""Analyses of a (dense or p-MoD) LLaVA checkpoint that guide how to convert it.

- ``arank``: gamma-MoD's rank of attention maps per layer, and the MoD layer set it proposes.
"""
