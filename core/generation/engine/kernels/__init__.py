"""The engine's native kernels: C++ torch operators built on this machine (`build`)."""
