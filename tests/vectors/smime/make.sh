#!/bin/sh
# Regenerates the S/MIME vectors in this folder with OpenSSL only (the independent peer).
# Run from this folder: sh make.sh   (OpenSSL 3.0 or later)
set -eu
D=36500
cat > ext.cnf <<'CNF'
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[alice]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = emailProtection
subjectAltName = email:alice@medecin.fr
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[gateway]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = emailProtection
subjectAltName = email:gw@passerelle.test
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
  -subj "/CN=VECTORS TEST CA/O=Passerelle tests/C=FR" -days $D -out ca.pem \
  -extensions ca -config ext.cnf 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout alice.key \
  -subj "/CN=Alice/O=Passerelle tests/C=FR" -out alice.csr 2>/dev/null
openssl x509 -req -in alice.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days $D \
  -extfile ext.cnf -extensions alice -out alice.pem 2>/dev/null
openssl req -new -newkey rsa:2048 -nodes -keyout gateway.key \
  -subj "/CN=Gateway/O=Passerelle tests/C=FR" -out gateway.csr 2>/dev/null
openssl x509 -req -in gateway.csr -CA ca.pem -CAkey ca.key -set_serial 3 -days $D \
  -extfile ext.cnf -extensions gateway -out gateway.pem 2>/dev/null
rm -f alice.csr gateway.csr ext.cnf ca.srl ca.key

printf 'Content-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu de test.\r\n' > part.txt
H="-from alice@medecin.fr -to gw@passerelle.test -subject vector -crlfeol"
openssl cms -sign -in part.txt -signer alice.pem -inkey alice.key -md sha256 $H \
  -out signed-multipart.eml
openssl cms -sign -in part.txt -signer alice.pem -inkey alice.key -md sha384 -nodetach \
  -stream $H -out signed-opaque-ber.eml
openssl cms -encrypt -in signed-multipart.eml -aes256 -recip gateway.pem \
  -keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 $H -out signed-then-aes256-oaep.eml
openssl cms -encrypt -in signed-multipart.eml -aes-256-gcm -recip gateway.pem $H \
  -out signed-then-aes256-gcm.eml
rm -f part.txt
