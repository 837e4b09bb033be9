//! A discrete-event simulator that replays job traces through the fleet policy and a model of the ClearML autoscaler.
