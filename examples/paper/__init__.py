"""Scripts reproducing the paper's tables and figures (``--preset paper|cpu|tiny``)."""
