"""The build's flow: plan the corpus into units, run each unit, finalize the output."""
