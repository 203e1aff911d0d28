"""One module per curve format, all building a `Curve` through one `CurveBuilder`."""
