"""CMS (RFC 5652) for the `smime` adapter, one job per module.

    entity       raw MIME octets: split, decode, make 7-bit for signing (never re-serialize)
    parse        loading ContentInfo from BER/DER; the failures the family raises
    identifiers  how CMS names a certificate (issuer and serial, SKI); comparing names
    directory    the directory's certificates indexed once per loaded configuration
    verify       SignedData signature verification (signed attributes, RSA/PSS/ECDSA/Ed25519)
    trust        certificate chain, validity, S/MIME purpose, CRL revocation (and what of it
                 is kept between messages)
    ciphers      AES-CBC/GCM, PKCS #7 padding, ECDH key derivation
    envelope     opening EnvelopedData / AuthEnvelopedData with the gateway's identity
    der          writing DER, as pieces joined once
    sign         making SignedData
    encrypt      making EnvelopedData / AuthEnvelopedData
    layers       peeling a received message's S/MIME layers
    verdict      from a verified signature to the Verdict (trust, From:, Date:)
"""
