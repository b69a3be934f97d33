"""Method reports: diagnostics and experiment commands a method brings (declared in its registry entry)."""
