/// The two native workarounds' decisions, on inputs built from their specifications: the ELF version patch and
/// the CPUID check that turns mkldnn off.
module Pmg.Fs.Tests.NativeTests

open System
open System.IO
open System.Text
open Expecto
open Pmg.Fs.Runtime

/// A minimal little-endian ELF64 built from the ELF and GNU symbol-versioning specifications: a string table and
/// one SHT_GNU_verneed section needing libstdc++.so.6 at two versions (GLIBCXX_3.4, then GLIBCXX_3.4.32).
let private elfNeeding () : byte[] * int * int =
    let bytes = Array.zeroCreate<byte> 384
    let put16 (o: int) (v: int) = BitConverter.GetBytes(uint16 v).CopyTo(bytes, o)
    let put32 (o: int) (v: int) = BitConverter.GetBytes(uint32 v).CopyTo(bytes, o)
    let put64 (o: int) (v: int) = BitConverter.GetBytes(uint64 v).CopyTo(bytes, o)
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB; e_shoff, e_shentsize, e_shnum.
    [| 0x7fuy; byte 'E'; byte 'L'; byte 'F'; 2uy; 1uy; 1uy |].CopyTo(bytes, 0)
    put64 0x28 192
    put16 0x3A 64
    put16 0x3C 3
    // .dynstr at 64.
    let strings = "\000libstdc++.so.6\000GLIBCXX_3.4\000GLIBCXX_3.4.32\000"
    Encoding.ASCII.GetBytes(strings).CopyTo(bytes, 64)
    let nameAt (s: string) = strings.IndexOf("\000" + s + "\000", StringComparison.Ordinal) + 1
    // Elf64_Verneed at 128: vn_version, vn_cnt, vn_file, vn_aux, vn_next.
    put16 128 1
    put16 130 2
    put32 132 (nameAt "libstdc++.so.6")
    put32 136 16
    put32 140 0
    // Elf64_Vernaux at 144 and 160: vna_hash, vna_flags, vna_other, vna_name, vna_next.
    put16 150 2
    put32 152 (nameAt "GLIBCXX_3.4")
    put32 156 16
    put16 166 3
    put32 168 (nameAt "GLIBCXX_3.4.32")
    put32 172 0
    // Section headers at 192: null; SHT_STRTAB at 64; SHT_GNU_verneed at 128 linked to section 1.
    put32 (192 + 64 + 4) 3
    put64 (192 + 64 + 0x18) 64
    put32 (192 + 128 + 4) 0x6ffffffe
    put64 (192 + 128 + 0x18) 128
    put32 (192 + 128 + 0x28) 1
    bytes, 144 + 4, 160 + 4

let private differingOffsets (a: byte[]) (b: byte[]) =
    [ for i in 0 .. a.Length - 1 do
          if a.[i] <> b.[i] then i ]

/// CPUID answers of a recorded processor: the vendor string in leaf 0, the rest from a table (zero elsewhere).
let private cpu (vendor: string) (leaves: (int * struct (int * int * int * int)) list) : Native.CpuId =
    let reg (i: int) = BitConverter.ToInt32(Encoding.ASCII.GetBytes vendor, 4 * i)
    fun leaf _ ->
        if leaf = 0 then struct (0x10, reg 0, reg 2, reg 1)
        else leaves |> List.tryFind (fun (l, _) -> l = leaf) |> Option.map snd |> Option.defaultValue (struct (0, 0, 0, 0))

let private amdExtended = int 0x80000000u
let private amdFeatures = int 0x80000001u
let private amdCache = int 0x8000001Du
let private dataCache = struct (0x121, 0, 0, 0)
let private topoext = struct (0, 0, 1 <<< 22, 0)

[<Tests>]
let tests =
    testList
        "native"
        [ test "markVersionWeak sets VER_FLG_WEAK on exactly the named requirement" {
              let elf, otherFlags, patchedFlags = elfNeeding ()
              match Native.markVersionWeak "GLIBCXX_3.4.32" elf with
              | None -> failtest "the requirement is in the file"
              | Some patched ->
                  Expect.equal (differingOffsets elf patched) [ patchedFlags ] "one byte: the low byte of that vna_flags"
                  Expect.equal (BitConverter.ToUInt16(patched, patchedFlags)) 2us "VER_FLG_WEAK"
                  Expect.equal (BitConverter.ToUInt16(patched, otherFlags)) 0us "GLIBCXX_3.4 stays required"
                  Expect.equal patched.Length elf.Length "same size"
          }
          test "markVersionWeak leaves a file without the requirement alone, and refuses what is not ELF64" {
              let elf, _, _ = elfNeeding ()
              Expect.isNone (Native.markVersionWeak "GLIBCXX_9.9" elf) "not needed: nothing to patch"
              Expect.throwsT<Pmg.Fs.NativeRuntimeException> (fun () -> Native.markVersionWeak "GLIBCXX_3.4.32" (Array.zeroCreate 128) |> ignore) "not ELF"
          }
          test "TorchSharp's libLibTorchSharp.so: one byte changes, in its GLIBCXX_3.4.32 requirement" {
              let version = typeof<TorchSharp.torch>.Assembly.GetName().Version
              let root =
                  match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
                  | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
                  | p -> p
              let lib = Path.Combine(root, "torchsharp", sprintf "%d.%d.%d" version.Major version.Minor version.Build, "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
              if not (File.Exists lib) then skiptest (lib + " is not in the package cache")
              let bytes = File.ReadAllBytes lib
              match Native.markVersionWeak "GLIBCXX_3.4.32" bytes with
              | None -> skiptest "this TorchSharp build does not need GLIBCXX_3.4.32"
              | Some patched ->
                  let changed = differingOffsets bytes patched
                  Expect.equal changed.Length 1 "one byte"
                  Expect.equal (patched.[changed.Head] &&& 2uy) 2uy "the weak bit"
          }
          test "mkldnn goes off exactly where CPUID reports no cache sizes" {
              let intel = "GenuineIntel"
              Expect.isFalse (Native.noCacheSizes (cpu intel [ 4, dataCache ])) "Intel with leaf 4"
              Expect.isTrue (Native.noCacheSizes (cpu intel [])) "Intel without leaf 4"
              let amd = "AuthenticAMD"
              let extended = amdExtended, struct (int 0x80000020u, 0, 0, 0)
              Expect.isFalse (Native.noCacheSizes (cpu amd [ extended; amdFeatures, topoext; amdCache, dataCache ])) "AMD with topology extensions and leaf 0x8000001D"
              Expect.isTrue (Native.noCacheSizes (cpu amd [ extended; amdCache, dataCache ])) "AMD without the topology extensions bit"
              Expect.isTrue (Native.noCacheSizes (cpu amd [ extended; amdFeatures, topoext ])) "AMD with an empty leaf 0x8000001D"
              Expect.isTrue (Native.noCacheSizes (cpu amd [ amdExtended, struct (int 0x80000008u, 0, 0, 0); amdFeatures, topoext; amdCache, dataCache ])) "AMD whose extended leaves stop before it"
              Expect.isFalse (Native.noCacheSizes (cpu "VIA VIA VIA " [])) "other vendors: oneDNN's cache path is not taken"
          } ]
