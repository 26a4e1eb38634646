"""servesim's discrete-event simulator and the pure scheduling code it shares with the runtime."""
