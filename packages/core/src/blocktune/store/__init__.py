"""The block store on disk: one file per unit, a manifest, atomic commits, one writer."""
