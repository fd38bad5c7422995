// js-libp2p 3 calls Promise.withResolvers, which Node.js has from version 22; Debian
// 12's machines here run Node.js 20. Imported first by device.mjs.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
