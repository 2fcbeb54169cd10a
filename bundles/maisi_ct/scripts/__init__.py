"""Glue of the maisi_ct bundle: small functions its configs call (shared code lives in ``common``)."""
