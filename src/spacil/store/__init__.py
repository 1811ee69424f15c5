"""The feature store: its format (`format`), encoding a data set into it (`extract`) and checking it (`check`)."""
