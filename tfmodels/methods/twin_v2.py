"""TWIN V2 (METHODS 2.4): cluster-aware target attention over a clustered life-cycle history.

Offline (``beam_jobs/cluster.py``, not a TF layer): each user's behaviors before a
snapshot are grouped by engagement and split by recursive k-means into clusters of
< gamma = 20 behaviors (Algorithm 1, T1); every cluster becomes one *virtual item*
(T2: numerical features = member means; T3: item id, category and domain of the
member nearest the centroid) with its size n, written as one row of the per-user
record (``hist_cluster_size``). The tf.data windows carry it as
``long_cluster_size`` (1 for real behaviors, 0 on padding).

Online (this layer) = :class:`tfmodels.methods.twin.Twin` on those rows with

* (T6, Eq. 9)  alpha' = alpha + ln n   (ln max(n, 1): padding never takes ln 0)
* (T7) GSU: top-100 rows by the mean over heads of alpha' (``gsu_log_n``)
* (T8, T9, Eq. 10) ESU: softmax(alpha')^T K W^v over the selected rows, i.e.
  weights n_i exp(alpha_i) / sum_j n_j exp(alpha_j) (``esu_log_n``)
* (T10, Eq. 11) Concat(4 heads) W^o.

With every n = 1 (an unclustered history, or records without
``hist_cluster_size``) ln n = 0 and the layer computes exactly TWIN (tested).
The Figure 4 ablations are registry variants: ``twin_v2_no_ln_gsu``
(``gsu_log_n=False``) and ``twin_v2_no_ln_esu`` (``esu_log_n=False``).

Cache (METHODS 1.5, TWIN V2 row): ``user_cache`` returns the virtual items'
inherent projections K_h W^h (``keys``), the cross term (K_c W^c) beta
(``cross``), K W^v (``values``), ln n (``log_n``) and the mask; ``score`` does
q W^q, alpha' over the window, the top-100 and the 4-head softmax.
"""
from __future__ import annotations

import tfmodels  # noqa: F401

from tfmodels.layers import serializable
from tfmodels.methods.twin import Twin


@serializable
class TwinV2(Twin):
    """Cluster-aware TWIN: ln n added to the GSU keys and the ESU logits (both by default)."""

    reads_fields = ("ts", "engage", "domain", "cluster_size")
    needs_clustered_data = True

    def __init__(self, emb_dim: int, gsu_log_n: bool = True, esu_log_n: bool = True, **kwargs):
        super().__init__(emb_dim, gsu_log_n=gsu_log_n, esu_log_n=esu_log_n, **kwargs)
        # The ablation with both flags off still declares cluster_size so that every
        # TWIN V2 variant has the same serving inputs (it just does not use them).
        self.reads_fields = self._fields(self.cross_features, True)
