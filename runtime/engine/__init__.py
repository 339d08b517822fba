"""The engine seam: the server talks to any inference backend only through `runtime.engine.base.Engine`."""
