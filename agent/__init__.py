"""chutes-attest: on-node attestation agent for confidential GPU VMs (Intel TDX + NVIDIA)."""

__version__ = "0.1.0"
