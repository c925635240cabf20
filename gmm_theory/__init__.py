"""Gaussian-mixture theory of paper 1 (arXiv 2405.20494 §4, Appendix C): closed forms, exact optimum, simulation,
label-flip model and the `python -m gmm_theory.verify` report."""
