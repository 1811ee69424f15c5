"""`spacil demo`: the run (`run`), its generated world of features (`world`) and the generated image set (`shapes`)."""
