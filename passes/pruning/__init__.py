"""Pruning: importance scores and the selection of what to drop (`importance.py`), activation
statistics over calibration data (`activations.py`), and two families of passes.

Weight masking (zeros written into the weights; the graph's shapes stay): `sites.py` (the
MatMul/Gemm/Conv layers whose weights may be masked, their scores, the masked replacement),
`storage.py` (sparse storage sizes and the pruning report), `unstructured.py`
(prune-unstructured) and `n_m.py` (prune-n-m).

Structured pruning (units removed: the model gets smaller): `structure.py` (the dependency
analysis) with `propagation.py` (its rules, one per op family), `driver.py` (scores, selection,
refit and report, shared by the passes), `slicing.py` (cutting every member of a group),
`channels.py`, `mlp.py`, `heads.py` (the passes), `refit.py` (least-squares refit) and
`structured_report.py` (the per-group report)."""
