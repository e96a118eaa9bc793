"""Penalty values written the plain way, through the (L, F, K) view with autograd's own
slicing: references for the written-out backwards (not collected as tests)."""


def plain_l2_grid(layer):
    """Σ ((d_q - d_p) m_pq)² over the 4-neighbour pairs of positions, offsets existing at both."""
    Lh, Lw = layer.output_shape
    d = layer.deviations().reshape(Lh, Lw, layer.out_channels, -1)
    m = layer.mask.reshape(Lh, Lw, 1, -1).to(d.dtype)
    return (((d[1:] - d[:-1]) * m[1:] * m[:-1]).pow(2).sum()
            + ((d[:, 1:] - d[:, :-1]) * m[:, 1:] * m[:, :-1]).pow(2).sum())
