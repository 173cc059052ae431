"""Kernel implementations (no input checks, no autograd): see segformer_fast.ops for the public ops."""
