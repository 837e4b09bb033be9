//! Cloud providers: where instances come from (AWS EC2, local processes), behind one trait.
