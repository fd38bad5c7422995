// Two js-libp2p devices against a running privstack-relay, over QUIC
// (@chainsafe/libp2p-quic):
//
//   node compat/js-libp2p/device.mjs /ip4/127.0.0.1/udp/4001/quic-v1/p2p/<relay>
//
// A connects and checks identify; B holds a reservation; A moves 64 MiB to B through
// a circuit and B reports the count; A stores a sync-group record through Kademlia
// (server mode) and leaves; C, a device that comes later, reads the record back from
// the relay. One "ok:" line per step; exit
// status 1 on the first failure.

import './node20.mjs'
import { createHash } from 'node:crypto'
import { createLibp2p } from 'libp2p'
import { quic } from '@chainsafe/libp2p-quic'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT } from '@libp2p/kad-dht'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { multiaddr } from '@multiformats/multiaddr'

const KAD = '/ipfs/kad/1.0.0'
const HOP = '/libp2p/circuit/relay/0.2.0/hop'
const SINK = '/privstack-compat/sink/1.0.0'
const CIRCUIT_BYTES = 64 * 1024 * 1024

function fail (what) {
  console.error(`FAIL: ${what}`)
  process.exit(1)
}

if (process.argv.length !== 3) fail('usage: node device.mjs RELAY_MULTIADDR')
const relay = multiaddr(process.argv[2])
const relayId = relay.getComponents().find(c => c.name === 'p2p')?.value
if (relayId == null) fail('the relay address ends without /p2p/<peer id>')

const timer = setTimeout(() => fail('timed out after 180 s'), 180_000)

function device (listen) {
  return createLibp2p({
    addresses: { listen },
    transports: [quic(), circuitRelayTransport()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify({ protocolPrefix: 'ipfs' }),
      ping: ping(),
      dht: kadDHT({
        protocol: KAD,
        clientMode: false,
        // The relay and the devices are on loopback: keep their addresses.
        peerInfoMapper: (peer) => peer,
        validators: { privstack: async () => {} },
        selectors: { privstack: () => 0 }
      })
    }
  })
}

async function until (what, check, ms = 60_000) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 100))
  }
}

const a = await device(['/ip4/127.0.0.1/udp/0/quic-v1'])
const b = await device(['/ip4/127.0.0.1/udp/0/quic-v1', `${relay}/p2p-circuit`])

await a.dial(relay).catch(e => fail(`A dials the relay: ${e}`))
const protocols = await until('identify from the relay', async () => {
  const peer = await a.peerStore.get(a.getConnections().find(c => c.remotePeer.toString() === relayId)?.remotePeer).catch(() => null)
  return peer?.protocols?.includes(KAD) ? peer.protocols : null
})
if (!protocols.includes(HOP)) fail(`the relay does not offer ${HOP}: ${protocols}`)
const agent = new TextDecoder().decode((await a.peerStore.get(a.getConnections()[0].remotePeer)).metadata.get('AgentVersion') ?? new Uint8Array())
console.log(`ok: QUIC connection and identify (${agent || 'no agent version'})`)

const circuitAddr = await until('the reservation', () =>
  b.getMultiaddrs().find(ma => ma.toString().includes('/p2p-circuit')))
console.log(`ok: reservation accepted (${circuitAddr})`)

await b.handle(SINK, async (stream) => {
  let n = 0
  for await (const chunk of stream) n += chunk.byteLength
  stream.send(new TextEncoder().encode(String(n)))
  await stream.close()
})
const started = Date.now()
// A new connection through the relay, even if A reached B directly for the DHT.
const relayed = await a.dial(circuitAddr, { force: true }).catch(e => fail(`A dials B through the relay: ${e}`))
if (!relayed.remoteAddr.toString().includes('/p2p-circuit')) fail(`A reached B at ${relayed.remoteAddr}, not through the relay`)
if (relayed.limits != null) fail(`the relay limited the circuit: ${JSON.stringify(relayed.limits)}`)
const stream = await relayed.newStream(SINK).catch(e => fail(`A opens a stream to B through the circuit: ${e}`))
const chunk = new Uint8Array(64 * 1024).fill(7)
for (let sent = 0; sent < CIRCUIT_BYTES; sent += chunk.byteLength) {
  if (!stream.send(chunk)) await stream.onDrain()
}
await stream.close()
let reply = ''
for await (const part of stream) reply += new TextDecoder().decode(part.subarray ? part.subarray() : part)
if (reply !== String(CIRCUIT_BYTES)) fail(`B received ${reply} bytes, not ${CIRCUIT_BYTES}`)
const seconds = (Date.now() - started) / 1000
console.log(`ok: 64 MiB through the circuit in ${seconds.toFixed(1)} s`)

const key = new Uint8Array(Buffer.concat([
  Buffer.from('/privstack/syncgroup/'),
  createHash('sha256').update('js-libp2p compat').digest()
]))
const value = new TextEncoder().encode(JSON.stringify({ device_name: 'js-libp2p' }))
await until('the relay in A\'s routing table', () => a.services.dht.routingTable.size > 0)
let stored = false
for await (const event of a.services.dht.put(key, value)) {
  if (event.name === 'PEER_RESPONSE' && event.from.toString() === relayId) stored = true
}
if (!stored) fail('the relay did not answer the PUT_VALUE')
console.log('ok: record stored on the relay')

// A leaves, and C, a device that was not there, reads the record from the relay.
await a.stop()
const c = await device(['/ip4/127.0.0.1/udp/0/quic-v1'])
await c.dial(relay).catch(e => fail(`C dials the relay: ${e}`))
await until('the relay in C\'s routing table', () => c.services.dht.routingTable.size > 0)
let found = null
for await (const event of c.services.dht.get(key)) {
  if (event.name === 'VALUE' && event.from.toString() === relayId) found = event.value
}
if (found == null) fail('C did not get the record from the relay')
if (Buffer.compare(Buffer.from(found), Buffer.from(value)) !== 0) fail('the record read back differs')
console.log('ok: record read back from the relay')

clearTimeout(timer)
await Promise.all([b.stop(), c.stop()])
process.exit(0)
