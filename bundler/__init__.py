"""Everything about a bundle: keys, manifest, signing, sources, create, verify, install and rollback onto a host."""
